"""The app config: one YAML file, validated here (pydantic, unknown keys refused) and converted once into
the frozen configs the lower layers take (`GroupConfig`, `EngineConfig`).

The same schema is what `gptoss-serve serve CONFIG` reads and what `serve run` / `serve deploy` /
KubeRay's serveConfigV2 pass as the `args` of `serve.app:build_app`. The `http` and `grpc` sections
start Ray Serve's proxies under `gptoss-serve serve`; under Ray's own tooling the Serve config's
`http_options` / `grpc_options` do that instead (see `grpc_options()` for the servicers to list).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from cluster.config import EplbConfig, GroupConfig
from engine.config import EngineConfig
from serve.validation import describe_validation_error

PositiveInt = Annotated[int, Field(gt=0)]
PositiveFloat = Annotated[float, Field(gt=0)]


class ConfigError(ValueError):
    """The app config is invalid; the message names the field (as a dotted path) and the rule."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSection(_Section):
    checkpoint: str | None = Field(
        None, description="Checkpoint folder (HF release layout or OpenAI's original/), readable on every "
                          "node. None: the embedded default model (random weights, written on first use).")
    name: str | None = Field(
        None, description="The model id clients send as `model` (default: the checkpoint folder's name).")
    dtype: Literal["bfloat16", "float32"] = Field("bfloat16", description="Weights and activations.")
    packed_experts: bool | Literal["auto"] = Field(
        "auto", description="Keep experts MXFP4 in memory (4.25 bits/weight). auto: on CPU where the MXFP4 "
                            "kernel builds (faster there); elsewhere only where dequantized experts would not "
                            "fit in free memory.")


class GroupSection(_Section):
    num_ranks: PositiveInt = Field(1, description="G: ranks (GPUs) per EP group; must divide the expert count.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: GPUs when the cluster has any.")
    communicator: Literal["auto", "torch_dist", "cupy_nccl"] = "auto"
    num_cpus_per_rank: PositiveFloat = 1.0
    placement_timeout_s: PositiveFloat = 60.0
    start_timeout_s: PositiveFloat = 600.0
    join_timeout_s: PositiveFloat = 300.0
    collective_timeout_s: PositiveFloat = 60.0
    load_timeout_s: PositiveFloat = 1800.0
    step_timeout_s: PositiveFloat = 120.0


class EplbSection(_Section):
    """Expert load balancing in each EP group (G >= 2): redundant copies of hot experts, placed from the
    live routing counts and rearranged between two steps (requests pause, none fails)."""

    enabled: bool = Field(False, description="Plan and rearrange every interval_steps (off by default until "
                                             "measured on real traffic).")
    redundant_experts_per_rank: Annotated[int, Field(ge=0)] = Field(
        1, description="Expert slots per rank beyond E/G, in every layer (their memory is held from the load on).")
    interval_steps: Annotated[int, Field(ge=0)] = Field(
        3000, description="Group steps between two rearrangements (0: only when asked).")
    window_steps: PositiveInt = Field(1000, description="The routed-token counts a plan reads cover about this "
                                                        "many last steps.")
    transfer: Literal["checkpoint", "communicator"] = Field(
        "checkpoint", description="How a rank gets the experts it newly holds: read from the checkpoint, or sent "
                                  "by a rank that holds them.")
    min_gain: Annotated[float, Field(ge=0, lt=1)] = Field(
        0.02, description="A layer moves only if its busiest rank's expected load drops by this share.")


class EngineSection(_Section):
    max_num_seqs: PositiveInt = Field(64, description="Most requests one rank runs in a step.")
    max_num_batched_tokens: PositiveInt = Field(2048, description="Token budget of one step.")
    block_size: PositiveInt = 16
    kv_cache_gib: PositiveFloat = Field(1.0, description="KV cache per rank, GiB.")
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    max_model_len: PositiveInt | None = Field(None, description="Prompt + output cap (default: the model's "
                                                                "context, capped by what the KV cache holds).")
    max_logprobs: Annotated[int, Field(ge=0)] = 20
    greedy_screen: bool = Field(
        False, description="CPU: greedy rows' tokens by a 7-bit screen of the unembedding, exact, with a copy of "
                           "it (0.59 GB at gpt-oss's width); off by default: at hidden 2880 on random weights it "
                           "decides too few rows to pay.")


class AutoscalingSection(_Section):
    """Serve's autoscaling of the model server, in whole EP groups (one replica = one group)."""

    min_replicas: Annotated[int, Field(ge=0)] = Field(1, description="Fewest groups (0 allows scaling to zero; "
                                                                     "the first request then waits for a load).")
    max_replicas: PositiveInt = Field(2, description="Most groups.")
    initial_replicas: Annotated[int, Field(ge=0)] | None = Field(None, description="Groups at deploy time "
                                                                                    "(default: min_replicas).")
    target_ongoing_requests: PositiveFloat = Field(
        32.0, description="Open requests per group Serve aims for: more per group adds a group.")
    upscale_delay_s: Annotated[float, Field(ge=0)] = Field(30.0, description="Load must stay high this long "
                                                                             "before a group is added.")
    downscale_delay_s: Annotated[float, Field(ge=0)] = Field(600.0, description="Load must stay low this "
                                                                                "long before a group is removed.")
    look_back_period_s: PositiveFloat = Field(30.0, description="Window over which the load is averaged.")

    @model_validator(mode="after")
    def _bounds_are_ordered(self) -> AutoscalingSection:
        if self.max_replicas < self.min_replicas:
            raise ValueError(f"max_replicas ({self.max_replicas}) must be >= min_replicas ({self.min_replicas})")
        if self.initial_replicas is not None and not self.min_replicas <= self.initial_replicas <= self.max_replicas:
            raise ValueError(f"initial_replicas ({self.initial_replicas}) must lie in [min_replicas, max_replicas] "
                             f"= [{self.min_replicas}, {self.max_replicas}]")
        return self


class RouterSection(_Section):
    """How the gateway picks a model server replica (an EP group) for each request."""

    policy: Literal["prefix_affinity", "power_of_two"] = Field(
        "prefix_affinity", description="prefix_affinity: the group that served the prompt's longest prefix "
                                       "(its KV blocks are cached there), unless it is much busier than the "
                                       "least busy; power_of_two: Ray Serve's default router.")
    max_extra_requests: Annotated[int, Field(ge=0)] = Field(
        16, description="prefix_affinity: the affine group is skipped when it has this many more open "
                        "requests than the least busy group (a hot prefix spills over).")
    prefix_blocks: PositiveInt = Field(256, description="Leading KV blocks of a prompt keyed for affinity.")
    max_keys: PositiveInt = Field(200_000, description="Prefix keys remembered per gateway replica (LRU).")


class ModelServerSection(_Section):
    num_replicas: PositiveInt | None = Field(
        None, description="EP groups (each a Serve replica of G ranks); default 1. Leave unset with autoscaling.")
    autoscaling: AutoscalingSection | None = Field(
        None, description="Scale the number of groups with the load (instead of num_replicas).")
    router: RouterSection = RouterSection()
    max_ongoing_requests: PositiveInt | None = Field(
        None, description="Requests one replica takes at once (default: 4 x max_num_seqs x G); the engine "
                          "queues what it cannot schedule.")
    max_queued_requests: int = Field(
        1000, ge=-1, description="Requests waiting for a replica before new ones get 429 (-1: no limit).")
    stream_interval_ms: Annotated[float, Field(ge=0)] = Field(
        0.0, description="Every chunk of a stream after the first waits at least this long after the previous "
                         "one (a fixed floor; the adaptive merging below needs none).")
    stream_merge_streams_per_token: Annotated[int, Field(ge=0)] = Field(
        16, description="Under load a chunk waits for more tokens: each this many streams open on the replica "
                        "add one token to what it waits for (1 token below 16 streams, 9 at 128); 0: every "
                        "chunk carries what is ready, as sampled.")
    stream_merge_max_wait_ms: Annotated[float, Field(ge=0)] = Field(
        50.0, description="The most a token waits for its chunk to fill: the added inter-token latency. A stream "
                          "whose latest two tokens came further apart than this does not wait (it would merge "
                          "nothing).")
    health_check_period_s: PositiveFloat = 5.0
    health_check_timeout_s: PositiveFloat = 30.0
    graceful_shutdown_timeout_s: PositiveFloat = Field(
        60.0, description="How long a removed replica lets its open requests finish before they are cut.")
    drain_grace_s: Annotated[float, Field(ge=0)] = Field(
        5.0, description="A removed replica's streams that have not finished within this are moved to another "
                         "group (gateway.max_migrations > 0); must be well inside graceful_shutdown_timeout_s.")
    num_cpus: PositiveFloat = Field(0.5, description="CPUs of the replica's own bundle (not its ranks'); a "
                                                    "placement bundle cannot be empty, so > 0.")
    stats_period_s: PositiveFloat = Field(
        2.0, description="How often a replica polls its group's figures (KV use, queues, prefix cache, step "
                         "times, experts, health), publishes them to the router and exports them as metrics.")

    @model_validator(mode="after")
    def _replicas_or_autoscaling(self) -> ModelServerSection:
        if self.num_replicas is not None and self.autoscaling is not None:
            raise ValueError("set num_replicas or autoscaling, not both (autoscaling sets the group count)")
        # The moved streams' re-prefill and the replica's own drain need room before Serve cuts them.
        if self.drain_grace_s > self.graceful_shutdown_timeout_s / 2:
            raise ValueError(f"drain_grace_s ({self.drain_grace_s:g}) must be at most half of "
                             f"graceful_shutdown_timeout_s ({self.graceful_shutdown_timeout_s:g})")
        return self


class GatewaySection(_Section):
    """The ingress replicas, and the limits every API (HTTP, gRPC, batch rows) applies in one place
    (serve/admission.py), each checked before anything is built in its size."""

    num_replicas: PositiveInt = 1
    num_cpus: Annotated[float, Field(ge=0)] = 0.5
    max_ongoing_requests: PositiveInt = 1000
    max_queued_requests: int = Field(
        1000, ge=-1, description="Requests waiting in the proxies for a gateway replica before new ones get "
                                 "429 / RESOURCE_EXHAUSTED (-1: no limit).")
    max_request_bytes: PositiveInt = Field(
        8 << 20, description="Largest HTTP body or gRPC message accepted (413 / RESOURCE_EXHAUSTED beyond); "
                             "`gptoss-serve serve` also sets Serve's gRPC proxy to refuse larger messages.")
    max_n: PositiveInt = Field(8, description="Largest `n` (choices per request) accepted.")
    max_stop_strings: PositiveInt = Field(16, description="Most stop strings per request.")
    max_stop_chars: PositiveInt = Field(256, description="Longest stop string, in characters.")
    max_prompts: PositiveInt = Field(128, description="Most prompts in one /v1/completions request.")
    max_messages: PositiveInt = Field(2048, description="Most messages in one chat.")
    max_tools: PositiveInt = Field(128, description="Most tools in one chat.")
    max_tool_schema_bytes: PositiveInt = Field(65536, description="Largest tool parameters schema, as JSON.")
    max_json_depth: PositiveInt = Field(64, description="Deepest nesting of a JSON body or a tool schema.")
    max_prompt_tokens: PositiveInt | None = Field(
        None, description="Longest prompt accepted, in tokens (default: what the model's context allows).")
    max_output_tokens: PositiveInt | None = Field(
        None, description="Largest max_tokens accepted; also the cap when a request sets none "
                          "(default: what the context leaves).")
    max_retries: Annotated[int, Field(ge=0)] = Field(
        2, description="A request whose group fails before its first token is sent to another group "
                       "this many times (its client sees nothing of it).")
    max_migrations: Annotated[int, Field(ge=0)] = Field(
        3, description="A stream whose group fails or is removed after tokens were sent moves to another group "
                       "with what it generated so far, this many times per choice (0: it fails as its group does).")
    migration_wait_s: Annotated[float, Field(ge=0)] = Field(
        30.0, description="A moving stream whose only groups left are ones this gateway saw fail waits up to this "
                          "long for Serve to replace them (a failed move there does not count against "
                          "max_migrations), then fails.")
    direct_ingress: bool | None = Field(
        None, description="Serve's direct ingress where `gptoss-serve serve` starts Ray: each gateway replica serves "
                          "HTTP and gRPC on http.port / grpc.port itself (replica i of one node on port + i), with no "
                          "Serve proxy on the way (a half to a third of the CPU per streamed token). Unset: on when "
                          "one gateway replica serves, else Serve's proxies (they put several replicas behind one "
                          "port). On a cluster of your own (--address, KubeRay) the cluster decides: set "
                          "RAY_SERVE_ENABLE_DIRECT_INGRESS=1 on every node before Ray starts.")
    token_channel: bool = Field(
        True, description="Model servers send each gateway replica the tokens of all its streams as one message "
                          "per engine step over a TCP connection (an ephemeral port on the gateway's node IP, "
                          "which model server nodes must reach); off: every chunk of every stream is one Ray "
                          "message in its Serve call.")
    admission_workers: Annotated[int, Field(ge=0)] = Field(
        1, description="Processes per gateway replica that parse, check and render requests, off the event "
                       "loop that streams every reply (0: on the loop, for trusted clients only).")
    admission_timeout_s: PositiveFloat = Field(
        10.0, description="A request whose admission (parsing, rendering) takes longer is refused (413) and "
                          "its worker replaced.")
    api_docs: bool | None = Field(
        None, description="Serve /docs, /redoc and /openapi.json (default: only when no API keys are configured).")
    metrics_endpoint: bool = Field(
        True, description="Serve the gptoss_* metrics at GET /metrics on the API port (Prometheus text; "
                          "public unless auth.public_health is off).")
    response_store_entries: Annotated[int, Field(ge=0)] = Field(
        10000, description="Responses (POST /v1/responses with store) kept for GET, input_items and "
                           "previous_response_id; the least recently used go first (0: nothing is stored).")
    response_store_bytes: PositiveInt = Field(
        256 << 20, description="Bytes of stored responses (their items as JSON) kept in all, in the store "
                               "deployment's process.")

    def uses_direct_ingress(self) -> bool:
        """Whether a Ray that `gptoss-serve serve` starts gets Serve's direct ingress."""
        return self.direct_ingress if self.direct_ingress is not None else self.num_replicas == 1


class BatchSection(_Section):
    """`gptoss-serve batch` / `serve.batch.batch_generate`: the pool of EP groups a batch job runs on."""

    num_groups: PositiveInt = Field(1, description="EP groups (each a Ray Data actor owning G ranks).")
    max_in_flight_per_group: PositiveInt | None = Field(
        None, description="Rows a group holds at once (default 2 x max_num_seqs x G: a full running batch "
                          "and as many waiting, so the group never drains between batches).")
    rows_per_batch: PositiveInt = Field(16, description="Rows per Ray Data batch handed to a group.")
    num_cpus_per_actor: Annotated[float, Field(ge=0)] = Field(
        0.25, description="CPUs of each group's Ray Data actor (its ranks reserve their own).")


class AuthSection(_Section):
    """API keys, checked on HTTP (`Authorization: Bearer KEY`) and gRPC (`authorization` metadata).
    With neither source set, every request is admitted."""

    api_keys_file: str | None = Field(
        None, description="A file of keys, one per line (`KEY`, or `TENANT KEY` to share a tenant's prefix "
                          "cache between its keys); `#` starts a comment. Re-read when it changes (rotation).")
    api_keys_env: str | None = Field(
        None, description="The name of an environment variable (of the gateway's processes) holding keys "
                          "separated by commas or newlines.")
    reload_period_s: PositiveFloat = Field(2.0, description="How often the keys file is checked for changes.")
    public_health: bool = Field(True, description="Let /health and grpc.health.v1 answer without a key "
                                                  "(for load balancers and Kubernetes probes).")

    @property
    def enabled(self) -> bool:
        return self.api_keys_file is not None or self.api_keys_env is not None


class HTTPSection(_Section):
    host: str = Field("127.0.0.1", description="0.0.0.0 to listen on every interface (e.g. in a pod).")
    port: Annotated[int, Field(ge=0, le=65535)] = 8000
    ssl_certfile: str | None = Field(None, description="TLS certificate (PEM) of the HTTP endpoint; with "
                                                       "ssl_keyfile it serves HTTPS.")
    ssl_keyfile: str | None = Field(None, description="The certificate's private key (PEM).")
    ssl_keyfile_password: str | None = None
    ssl_ca_certs: str | None = Field(None, description="CA bundle to verify client certificates against.")

    @model_validator(mode="after")
    def _cert_and_key_together(self) -> HTTPSection:
        if (self.ssl_certfile is None) != (self.ssl_keyfile is None):
            raise ValueError("ssl_certfile and ssl_keyfile must be given together")
        return self


class GRPCSection(_Section):
    port: Annotated[int, Field(ge=0, le=65535)] = 9000
    enabled: bool = True


class AppConfig(_Section):
    """Everything `gptoss-serve serve` and `build_app` need; every field has a default."""

    model: ModelSection = ModelSection()
    group: GroupSection = GroupSection()
    eplb: EplbSection = EplbSection()
    engine: EngineSection = EngineSection()
    model_server: ModelServerSection = ModelServerSection()
    gateway: GatewaySection = GatewaySection()
    batch: BatchSection = BatchSection()
    auth: AuthSection = AuthSection()
    http: HTTPSection = HTTPSection()
    grpc: GRPCSection = GRPCSection()

    @model_validator(mode="after")
    def _eplb_needs_a_group(self) -> AppConfig:
        if self.eplb.enabled and self.group.num_ranks < 2:
            raise ValueError("eplb.enabled needs group.num_ranks >= 2 (one rank holds every expert: nothing to "
                             f"balance), got group.num_ranks={self.group.num_ranks}")
        return self

    @model_validator(mode="after")
    def _engine_budget_covers_every_running_request(self) -> AppConfig:
        if self.engine.max_num_batched_tokens < self.engine.max_num_seqs:
            raise ValueError(f"engine.max_num_batched_tokens must be >= engine.max_num_seqs "
                             f"({self.engine.max_num_seqs}): every running request decodes a token per step")
        return self

    # --- conversion to the lower layers' configs ---------------------------------------------------

    def checkpoint_path(self) -> str:
        """The checkpoint folder; the embedded default model is written here on first use."""
        if self.model.checkpoint is not None:
            return self.model.checkpoint
        from gptoss.writer import cached_random_checkpoint

        return str(cached_random_checkpoint(DEFAULT_PRESET, seed=0))

    def served_model_name(self) -> str:
        if self.model.name:
            return self.model.name
        if self.model.checkpoint is None:
            return DEFAULT_MODEL_NAME
        return Path(self.model.checkpoint).resolve().name or "gpt-oss"

    def engine_config(self) -> EngineConfig:
        e = self.engine
        return _converted("engine", EngineConfig, max_num_seqs=e.max_num_seqs,
                          max_num_batched_tokens=e.max_num_batched_tokens, block_size=e.block_size,
                          kv_cache_bytes=int(e.kv_cache_gib * (1 << 30)),
                          enable_prefix_caching=e.enable_prefix_caching,
                          enable_chunked_prefill=e.enable_chunked_prefill, max_model_len=e.max_model_len,
                          max_logprobs=e.max_logprobs, greedy_screen=e.greedy_screen)

    def group_config(self, checkpoint: str, name: str, device: str | None = None) -> GroupConfig:
        """The EP group's config; `device` overrides group.device (the builder resolves "auto" once,
        so the replica's bundles and its ranks agree)."""
        g = self.group
        packed = None if self.model.packed_experts == "auto" else self.model.packed_experts
        return _converted("group", GroupConfig, checkpoint=checkpoint, num_ranks=g.num_ranks,
                          dtype=self.model.dtype, packed_experts=packed, engine=self.engine_config(),
                          device=device or g.device, communicator=g.communicator, num_cpus_per_rank=g.num_cpus_per_rank,
                          placement_timeout_s=g.placement_timeout_s, start_timeout_s=g.start_timeout_s,
                          join_timeout_s=g.join_timeout_s,
                          collective_timeout_s=g.collective_timeout_s, load_timeout_s=g.load_timeout_s,
                          step_timeout_s=g.step_timeout_s, eplb=_converted("eplb", EplbConfig, **dict(self.eplb)),
                          name=name)

    def request_limits(self):
        """The limits every API applies (serve/admission.py)."""
        from serve.admission import RequestLimits

        g = self.gateway
        return RequestLimits(max_request_bytes=g.max_request_bytes, max_n=g.max_n,
                             max_logprobs=self.engine.max_logprobs, max_stop_strings=g.max_stop_strings,
                             max_stop_chars=g.max_stop_chars, max_prompts=g.max_prompts, max_messages=g.max_messages,
                             max_tools=g.max_tools, max_tool_schema_bytes=g.max_tool_schema_bytes,
                             max_json_depth=g.max_json_depth, max_prompt_tokens=g.max_prompt_tokens,
                             max_output_tokens=g.max_output_tokens)

    def max_ongoing_requests_per_replica(self) -> int:
        return self.model_server.max_ongoing_requests or 4 * self.engine.max_num_seqs * self.group.num_ranks


DEFAULT_PRESET = "tiny"
DEFAULT_MODEL_NAME = "gpt-oss-tiny-random"


def _converted(section: str, cls, **fields):
    try:
        return cls(**fields)
    except ValueError as e:  # the lower layers name their field: "engine config: max_model_len must be ..."
        raise ConfigError(f"{section}: {e}") from None


def parse_config(raw: Any, source: str = "config") -> AppConfig:
    """Validates a config mapping (YAML's top level; None or {} for all defaults).

    Raises:
        ConfigError naming each wrong field as a dotted path, with the rule and the allowed values.
    """
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: must be a mapping of sections (model, group, engine, ...), "
                          f"got {type(raw).__name__}")
    try:
        return AppConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(f"{source}: " + "; ".join(describe_validation_error(e))) from None


def load_config(path: str | Path | None) -> AppConfig:
    """The app config from a YAML file; None gives the defaults (the embedded default model)."""
    if path is None:
        return AppConfig()
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the config ({e.strerror or e})") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    return parse_config(raw, str(path))
