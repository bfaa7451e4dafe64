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

from cluster.config import GroupConfig
from engine.config import EngineConfig

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
        "auto", description="Keep experts MXFP4 in memory (4.25 bits/weight). auto: only where dequantized "
                            "experts would not fit in free memory.")


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


class ModelServerSection(_Section):
    num_replicas: PositiveInt = Field(1, description="EP groups (each a Serve replica of G ranks).")
    max_ongoing_requests: PositiveInt | None = Field(
        None, description="Requests one replica takes at once (default: 4 x max_num_seqs x G); the engine "
                          "queues what it cannot schedule.")
    max_queued_requests: int = Field(
        1000, ge=-1, description="Requests waiting for a replica before new ones get 429 (-1: no limit).")
    stream_interval_ms: Annotated[float, Field(ge=0)] = Field(
        0.0, description="Merge a stream's tokens for up to this long before sending them on (the first "
                         "token always goes at once): fewer messages through Ray at high concurrency.")
    health_check_period_s: PositiveFloat = 5.0
    health_check_timeout_s: PositiveFloat = 30.0
    graceful_shutdown_timeout_s: PositiveFloat = Field(
        60.0, description="How long a removed replica lets its open requests finish.")
    num_cpus: PositiveFloat = Field(0.5, description="CPUs of the replica's own bundle (not its ranks'); a "
                                                    "placement bundle cannot be empty, so > 0.")


class GatewaySection(_Section):
    num_replicas: PositiveInt = 1
    num_cpus: Annotated[float, Field(ge=0)] = 0.5
    max_ongoing_requests: PositiveInt = 1000
    max_n: PositiveInt = Field(8, description="Largest `n` (choices per request) accepted.")
    max_request_bytes: PositiveInt = Field(8 << 20, description="Largest HTTP request body accepted.")


class HTTPSection(_Section):
    host: str = Field("127.0.0.1", description="0.0.0.0 to listen on every interface (e.g. in a pod).")
    port: Annotated[int, Field(ge=0, le=65535)] = 8000


class GRPCSection(_Section):
    port: Annotated[int, Field(ge=0, le=65535)] = 9000
    enabled: bool = True


class AppConfig(_Section):
    """Everything `gptoss-serve serve` and `build_app` need; every field has a default."""

    model: ModelSection = ModelSection()
    group: GroupSection = GroupSection()
    engine: EngineSection = EngineSection()
    model_server: ModelServerSection = ModelServerSection()
    gateway: GatewaySection = GatewaySection()
    http: HTTPSection = HTTPSection()
    grpc: GRPCSection = GRPCSection()

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
                          max_logprobs=e.max_logprobs)

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
                          step_timeout_s=g.step_timeout_s, name=name)

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


def describe_validation_error(error: ValidationError) -> list[str]:
    """One line per problem: "engine.max_num_seqs: Input should be greater than 0 (got -1)"."""
    lines = []
    for problem in error.errors():
        where = ".".join(str(part) for part in problem["loc"]) or "(top level)"
        message = problem["msg"]
        if problem["type"] == "extra_forbidden":
            message = "unknown field"
        elif "input" in problem and not isinstance(problem["input"], dict | list):
            message += f" (got {problem['input']!r})"
        lines.append(f"{where}: {message}")
    return lines
