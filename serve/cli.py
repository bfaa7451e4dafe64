"""`gptoss-serve`: the command line."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from gptoss.load import TORCH_DTYPES as DTYPES

PACKED_EXPERTS = {"auto": None, "yes": True, "no": False}  # --packed-experts -> load_model(packed_experts=)


class BatchSampling(BaseModel):
    """The sampling fields of a `--batch-file` line; each one left out takes the flag of its name."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)
    max_tokens: int | None = Field(None, description="tokens to generate at most")
    temperature: float | None = Field(None, description="0 is greedy")
    top_p: float | None = Field(None, description="nucleus mass in (0, 1]")
    top_k: int | None = Field(None, description="keep the k most likely tokens; 0 keeps every token")
    seed: int | None = Field(None, description="same seed, same prompt: same tokens")


class BatchLine(BatchSampling):
    """One line of a `--batch-file` (JSONL): a prompt and, optionally, its own sampling fields."""

    id: str | None = Field(None, description="the result's id (default: line-<number>); unique in the file")
    prompt: str | None = Field(None, description="a user message, rendered with harmony")
    prompt_token_ids: list[int] | None = Field(None, description="an already rendered prompt")
    system: str | None = Field(None, description="system (developer) instructions for `prompt`")
    reasoning_effort: Literal["low", "medium", "high"] | None = Field(None, description="for `prompt`")

    @model_validator(mode="after")
    def one_prompt(self):
        if (self.prompt is None) == (self.prompt_token_ids is None):
            raise ValueError("give exactly one of `prompt` and `prompt_token_ids`")
        return self


def default_checkpoint_dir() -> Path:
    """The embedded default model: a random-weight `tiny` checkpoint in the release layout, written
    once under $GPTOSS_CACHE_DIR (no model hub is needed to try the system)."""
    from serve.config import AppConfig

    return Path(AppConfig().checkpoint_path())


def cmd_serve(args: argparse.Namespace) -> int:
    """Starts Ray (or joins --address), deploys the app, prints the endpoints, blocks until Ctrl-C."""
    import signal

    from serve.config import ConfigError, load_config

    try:
        config = load_config(args.config)
        config = _with_overrides(config, args)
    except ConfigError as e:
        print(f"gptoss-serve serve: error: {e}", file=sys.stderr)
        return 2
    if config.model.checkpoint is None:
        print("(no model.checkpoint in the config: serving the embedded default model, random weights)",
              file=sys.stderr)
    checkpoint = config.checkpoint_path()  # writes the embedded model here first, when it is the one
    problem = _check_against_checkpoint(config, checkpoint)
    if problem:
        print(f"gptoss-serve serve: error: {problem}", file=sys.stderr)
        return 2

    import ray
    from ray import serve
    from ray.serve.config import HTTPOptions, gRPCOptions

    from serve.app import GRPC_SERVICER_FUNCTIONS, build_app_from_config

    stop = _StopSignal()
    address = args.address or os.environ.get("RAY_ADDRESS")
    grpc_limit = str(config.gateway.max_request_bytes)
    if address is None:
        # Serve's gRPC proxy, a process of the Ray started here, reads this at start: messages over the
        # gateway's limit are refused there, before they travel (its default is 2 GiB).
        os.environ["RAY_SERVE_GRPC_MAX_MESSAGE_SIZE"] = grpc_limit
    elif config.grpc.enabled and os.environ.get("RAY_SERVE_GRPC_MAX_MESSAGE_SIZE") != grpc_limit:
        print(f"note: the cluster's gRPC proxies take messages up to their own RAY_SERVE_GRPC_MAX_MESSAGE_SIZE; set "
              f"it to {grpc_limit} (gateway.max_request_bytes) on every node so that larger ones are refused "
              f"there, not only by the gateway", file=sys.stderr)
    direct = address is None and config.gateway.uses_direct_ingress()
    proxy_ports = (config.http.port, config.grpc.port)
    if direct:
        proxy_ports = direct_ingress_environment(config)
    elif address is not None and config.gateway.direct_ingress:
        print("note: with --address the cluster decides on direct ingress: set RAY_SERVE_ENABLE_DIRECT_INGRESS=1 "
              "(and the RAY_SERVE_DIRECT_INGRESS_*_PORT ranges) on every node before Ray starts", file=sys.stderr)
    # Without --address (or RAY_ADDRESS) a Ray of its own: plain ray.init() would join any Ray already
    # running on this machine and could replace another app's routes there.
    ray.init(address=address or "local", namespace="gptoss-serve")
    try:
        h = config.http
        serve.start(http_options=HTTPOptions(host=h.host, port=proxy_ports[0], ssl_certfile=h.ssl_certfile,
                                             ssl_keyfile=h.ssl_keyfile, ssl_keyfile_password=h.ssl_keyfile_password,
                                             ssl_ca_certs=h.ssl_ca_certs),
                    grpc_options=gRPCOptions(
                        port=proxy_ports[1], enable_reflection=True,
                        grpc_servicer_functions=GRPC_SERVICER_FUNCTIONS if config.grpc.enabled else []))
        a = config.model_server.autoscaling
        groups = (f"{a.min_replicas}-{a.max_replicas} groups, autoscaled" if a is not None
                  else f"{config.model_server.num_replicas or 1} group(s)")
        print(f"deploying {config.served_model_name()!r} ({config.group.num_ranks} rank(s) per EP group, "
              f"{groups}); loading progress follows", file=sys.stderr)
        serve.run(build_app_from_config(config), name="gptoss", route_prefix="/", blocking=False)
        host = "127.0.0.1" if config.http.host in ("0.0.0.0", "::") else config.http.host
        scheme = "https" if h.ssl_certfile else "http"
        ingress = ""
        if direct:
            n = config.gateway.num_replicas
            ingress = ("direct ingress: the gateway replica serves these ports itself" + (
                "" if n == 1 else f" (replica i of a node: port + i, i < {n})") +
                f"; Serve's proxy, a fallback, at {proxy_ports[0]} / {proxy_ports[1]}\n")
        print(f"serving {config.served_model_name()!r}\n"
              f"  OpenAI API: {scheme}://{host}:{config.http.port}/v1  (health: /health)\n"
              + (f"  gRPC:       {host}:{config.grpc.port}  (gptoss.v1.GptossService, reflection on)\n"
                 if config.grpc.enabled else "")
              + f"  metrics:    {_metrics_addresses(config, scheme, host)}\n"
              + (f"  {ingress}" if ingress else "")
              + "Ctrl-C stops it.", file=sys.stderr, flush=True)
        stop.wait()
        print("shutting down", file=sys.stderr)
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the clean shutdown
        serve.shutdown()
        ray.shutdown()
    return 0


def direct_ingress_environment(config) -> tuple[int, int]:
    """Sets up the environment of the Ray about to start here for Serve's direct ingress (read at import by
    every Serve process): the gateway replicas of a node take http.port / grpc.port and the ones after
    them, and a port a replica leaves is free again at once (Serve holds it back only for its HAProxy
    mode). Returns the ports for Serve's own proxy, which Serve keeps on the head node as a fallback."""
    n = config.gateway.num_replicas
    os.environ.update({
        "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1", "RAY_SERVE_PORT_QUARANTINE_S": "0",
        "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(config.http.port),
        "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(config.http.port + n),
        "RAY_SERVE_DIRECT_INGRESS_MIN_GRPC_PORT": str(config.grpc.port),
        "RAY_SERVE_DIRECT_INGRESS_MAX_GRPC_PORT": str(config.grpc.port + n)})
    return _free_port(), _free_port()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _metrics_addresses(config, scheme: str, host: str) -> str:
    """Where Prometheus finds the metrics: GET /metrics on the API port (the gptoss_* series) and Ray's
    export port on this node (every series; the port Ray chose)."""
    import ray

    node_ip = ray.util.get_node_ip_address()
    ports = [n["MetricsExportPort"] for n in ray.nodes() if n.get("Alive") and n.get("NodeManagerAddress") == node_ip]
    ray_export = f"http://{node_ip}:{ports[0]}/metrics" if ports else "none on this node"
    if not config.gateway.metrics_endpoint:
        return f"{ray_export}  (Ray's export; gateway.metrics_endpoint is off)"
    return f"{scheme}://{host}:{config.http.port}/metrics  (all of Ray's: {ray_export})"


class _StopSignal:
    """Ctrl-C (SIGINT) or SIGTERM ends `wait`."""

    def __init__(self) -> None:
        import signal
        import threading

        self._event = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: self._event.set())

    def wait(self) -> None:
        while not self._event.wait(0.5):
            pass


def _with_overrides(config, args: argparse.Namespace):
    """The config with the command line's --checkpoint / --host / --http-port / --grpc-port /
    --direct-ingress / --serve-proxy applied."""
    from serve.config import parse_config

    raw = config.model_dump()
    if args.checkpoint:
        raw["model"]["checkpoint"] = args.checkpoint
    for section, key, value in (("http", "host", args.host), ("http", "port", args.http_port),
                                ("grpc", "port", args.grpc_port), ("gateway", "direct_ingress", args.direct_ingress)):
        if value is not None:
            raw[section][key] = value
    return parse_config(raw, "command line")


def _check_against_checkpoint(config, checkpoint: str) -> str | None:
    """What the config asks that this checkpoint cannot do (read here when the folder is readable)."""
    from gptoss import load_config as read_model_config
    from gptoss.errors import CheckpointError

    if not Path(checkpoint).is_dir():
        return None  # e.g. mounted only on the worker nodes: the ranks will say
    try:
        model = read_model_config(checkpoint)
    except CheckpointError as e:
        return str(e)
    g, e = config.group.num_ranks, model.num_local_experts
    if e % g:
        return (f"group.num_ranks must divide the model's {e} experts, got {g}; one of "
                f"{[d for d in range(1, e + 1) if e % d == 0]}")
    if config.eplb.enabled:
        from parallel.rebalance import max_redundant_per_rank

        most, asked = max_redundant_per_rank(e, g), config.eplb.redundant_experts_per_rank
        if asked > most:
            return (f"eplb.redundant_experts_per_rank must be at most {most} (the experts held by other ranks; "
                    f"{e} experts over {g} ranks), got {asked}")
    return None


def cmd_batch(args: argparse.Namespace) -> int:
    """Runs every input row not yet in the output folder; Ctrl-C keeps what finished (rerun resumes)."""
    from serve.config import ConfigError, load_config, parse_config

    try:
        config = load_config(args.config)
        if args.checkpoint:
            raw = config.model_dump()
            raw["model"]["checkpoint"] = args.checkpoint
            config = parse_config(raw, "command line")
    except ConfigError as e:
        print(f"gptoss-serve batch: error: {e}", file=sys.stderr)
        return 2
    if not Path(args.input).exists():
        print(f"gptoss-serve batch: error: {args.input}: no such input file or folder", file=sys.stderr)
        return 2
    problem = _check_against_checkpoint(config, config.checkpoint_path())
    if problem:
        print(f"gptoss-serve batch: error: {problem}", file=sys.stderr)
        return 2

    import ray

    from serve.batch import run_batch

    ray.init(address=args.address or os.environ.get("RAY_ADDRESS") or "local", namespace="gptoss-batch",
             log_to_driver=False)
    try:
        import ray.data

        ray.data.DataContext.get_current().enable_progress_bars = False  # ours reports rows, tokens/s, ETA
        summary = run_batch(config, args.input, args.output, args.output_format, flush_rows=args.rows_per_part)
    except KeyboardInterrupt:
        print("interrupted: the rows that finished are written; rerun the same command to resume",
              file=sys.stderr)
        return 130
    finally:
        ray.shutdown()
    return 0 if summary.num_written + summary.num_skipped == summary.num_rows else 1


def cmd_checkpoint(args: argparse.Namespace) -> int:
    from gptoss import write_random_checkpoint

    start = time.perf_counter()
    out = write_random_checkpoint(args.out, args.preset, seed=args.seed, layout=args.layout)
    print(f"wrote a random {args.preset} checkpoint ({args.layout} layout, seed {args.seed}) to {out} "
          f"in {time.perf_counter() - start:.1f} s")
    return 0


def cmd_kernels(args: argparse.Namespace) -> int:
    """--prebuild DIR: every kernel at every portable CPU level, for an image (deploy/Dockerfile); else
    how each kernel runs on this machine (the greedy screen too, which engines load only when
    engine.greedy_screen asks for it)."""
    from engine.kernels import KERNEL_SOURCES, prepare_cpu_kernels
    from gptoss import native

    if args.prebuild:
        manifest = native.prebuild(KERNEL_SOURCES, Path(args.prebuild))
        for name, entry in manifest.items():
            print(f"{name}: {', '.join(entry['builds'])}")
        return 0
    for name, how in prepare_cpu_kernels(greedy_screen=True).items():
        print(f"{name}: {how}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from engine import Engine, EngineConfig
    from gptoss import load_config, load_model, unembedding_copy_bytes
    from gptoss.errors import CheckpointError, InsufficientMemoryError, ServerError

    lines = read_batch_file(args.batch_file) if args.batch_file else None  # a bad file fails before loading
    checkpoint = args.checkpoint or default_checkpoint_dir()
    if not args.checkpoint:
        print(f"(no --checkpoint: using the embedded default model, random weights, at {checkpoint})",
              file=sys.stderr)
    printer = LoadProgressPrinter(sys.stderr)
    try:
        copies = unembedding_copy_bytes(load_config(checkpoint), DTYPES[args.dtype], args.device, args.greedy_screen)
        model = load_model(checkpoint, dtype=DTYPES[args.dtype], device=args.device,
                           packed_experts=PACKED_EXPERTS[args.packed_experts], progress_bytes=printer,
                           check_memory=not args.skip_memory_check, reserve_bytes=copies)
    except ServerError as e:  # a broken checkpoint, or one that does not fit: no traceback
        hint = ("\n(here: --packed-experts yes, --dtype bfloat16, or --skip-memory-check)"
                if isinstance(e, InsufficientMemoryError) else "")
        print(f"gptoss-serve generate: error: {e}{hint}", file=sys.stderr)
        # The checkpoint is the command line's: a wrong one is a usage error (2), as in `serve`.
        return 2 if isinstance(e, CheckpointError) else 1
    printer.finish()
    engine = Engine(model, EngineConfig(max_num_seqs=args.max_num_seqs, kv_cache_bytes=args.kv_cache_mib << 20,
                                        greedy_screen=args.greedy_screen))
    if lines is not None:
        return _generate_batch(engine, args, lines)
    return _generate_one(engine, args)


class LoadProgressPrinter:
    """`load_model(progress_bytes=...)` on a console stream: "loading weights: 3.2 of 12.9 GiB (25%),
    410 MB/s", rewritten in place on a terminal, else a line at most every `interval_s` (logs stay
    short); `finish()` prints the total and the mean rate."""

    def __init__(self, stream, clock=time.monotonic, interval_s: float = 1.0):
        self.stream, self.clock, self.interval_s = stream, clock, interval_s
        self.in_place = stream.isatty()
        self.start_s = self.last_s = clock()
        self.num_bytes_done = 0

    def __call__(self, num_bytes_done: int, num_bytes_total: int) -> None:
        self.num_bytes_done = num_bytes_done
        now = self.clock()
        if now - self.last_s < self.interval_s:
            return
        self.last_s = now
        share = num_bytes_done / max(num_bytes_total, 1)
        self._write(f"loading weights: {_size(num_bytes_done)} of {_size(num_bytes_total)} ({share:.0%}), "
                    f"{self._rate_mb_s(now):.0f} MB/s")

    def finish(self) -> None:
        now = self.clock()
        self._write(f"loaded {_size(self.num_bytes_done)} of weights in {now - self.start_s:.1f} s "
                    f"({self._rate_mb_s(now):.0f} MB/s)", last=True)

    def _rate_mb_s(self, now: float) -> float:
        return self.num_bytes_done / max(now - self.start_s, 1e-9) / 1e6

    def _write(self, line: str, last: bool = False) -> None:
        if self.in_place:  # back to the line's start, and clear what a longer line left
            self.stream.write(f"\r{line}\x1b[K" + ("\n" if last else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


def _size(num_bytes: int) -> str:
    return f"{num_bytes / (1 << 30):.1f} GiB" if num_bytes >= 1 << 30 else f"{num_bytes / (1 << 20):.1f} MiB"


def _sampling(args: argparse.Namespace, line: BatchSampling | None = None):
    """SamplingParams from the flags, with the fields a batch line sets in their place."""
    from engine import SamplingParams

    fields = {name: getattr(args, name) for name in BatchSampling.model_fields}
    if line is not None:
        fields |= line.model_dump(include=set(BatchSampling.model_fields), exclude_none=True)
    return SamplingParams(**fields)


def _generate_one(engine, args: argparse.Namespace) -> int:
    """One chat turn, streamed through the engine into the harmony parser."""
    from gptoss.harmony import ChatMessage, StreamingParser, render_prompt
    from gptoss.tokenizer import decode

    messages = ([ChatMessage("system", args.system)] if args.system else []) + [ChatMessage("user", args.prompt)]
    prompt_ids = render_prompt(messages, reasoning_effort=args.reasoning_effort)
    engine.add_request("cli", prompt_ids, _sampling(args))
    parser = StreamingParser()
    start = time.perf_counter()
    completion_ids: list[int] = []
    while engine.has_work():
        for out in engine.step():
            parser.feed(out.new_token_ids)
            completion_ids.extend(out.new_token_ids)
    parser.finish()
    num_tokens = len(completion_ids)
    elapsed = time.perf_counter() - start
    result = parser.result()
    if args.show_analysis:
        print(f"[analysis]\n{result.analysis}\n")
    for call in result.tool_calls:
        print(f"[tool call] {call.name}({call.arguments})")
    if result.final or result.tool_calls:
        print(result.final)
    else:  # e.g. a random-weight model, which does not speak harmony
        print(f"(no harmony final message; the raw completion is)\n{decode(completion_ids)!r}")
    note = " (stopped by max_tokens)" if result.truncated else ""
    print(f"\n{len(prompt_ids)} prompt tokens, {num_tokens} generated in {elapsed:.2f} s "
          f"({num_tokens / elapsed:.1f} tokens/s){note}", file=sys.stderr)
    return 0


def _generate_batch(engine, args: argparse.Namespace, lines: list[tuple[int, BatchLine]]) -> int:
    """Every prompt of a JSONL file at once through the engine; one JSON result per line on stdout (in
    input order) and the throughput on stderr."""
    import json

    from gptoss.harmony import ChatMessage, parse_completion, render_prompt
    from gptoss.tokenizer import decode

    ids = []
    for number, line in lines:
        if line.prompt_token_ids is not None:
            prompt_ids = line.prompt_token_ids
        else:
            messages = ([ChatMessage("system", line.system)] if line.system else []) + [ChatMessage("user", line.prompt)]
            prompt_ids = render_prompt(messages, reasoning_effort=line.reasoning_effort or args.reasoning_effort)
        try:
            engine.add_request(line.id, prompt_ids, _sampling(args, line))
        except ValueError as e:
            raise ValueError(f"{args.batch_file} line {number} (id {line.id!r}): {e}") from None
        ids.append(line.id)
    start = time.perf_counter()
    completion_ids: dict[str, list[int]] = {rid: [] for rid in ids}
    finished = {}
    while engine.has_work():
        for out in engine.step():
            completion_ids[out.request_id].extend(out.new_token_ids)
            if out.finished:
                finished[out.request_id] = out
    elapsed = time.perf_counter() - start
    for rid in ids:
        tokens, out = completion_ids[rid], finished[rid]
        parsed = parse_completion(tokens)
        record = {"id": rid, "finish_reason": out.finish_reason, "prompt_tokens": out.num_prompt_tokens,
                  "completion_tokens": len(tokens), "cached_tokens": out.num_cached_tokens,
                  "text": parsed.final if parsed.final or parsed.tool_calls else decode(tokens), "token_ids": tokens}
        if parsed.tool_calls:
            record["tool_calls"] = [{"name": c.name, "arguments": c.arguments} for c in parsed.tool_calls]
        if args.show_analysis:
            record["analysis"] = parsed.analysis
        print(json.dumps(record, ensure_ascii=False))
    stats = engine.get_stats()
    num_prompt = sum(o.num_prompt_tokens for o in finished.values())
    num_generated = sum(len(t) for t in completion_ids.values())
    print(f"\n{len(ids)} prompts ({num_prompt} prompt tokens, {stats.prefix_cache_hit_tokens} from the prefix cache), "
          f"{num_generated} tokens generated in {elapsed:.2f} s: {num_generated / elapsed:.1f} tokens/s, "
          f"{(num_prompt + num_generated) / elapsed:.1f} tokens/s with the prompts; {stats.num_steps} engine steps, "
          f"{stats.mean_tokens_per_step:.1f} tokens/step, {stats.num_preemptions} preemptions", file=sys.stderr)
    return 0


def read_batch_file(path: str) -> list[tuple[int, BatchLine]]:
    """Reads a JSONL batch, one `BatchLine` object per line (blank lines skipped).

    Returns:
        (line number, line) for each line, in file order, every `id` set.
    Raises:
        ValueError naming the line and the field; FileNotFoundError.
    """
    import json

    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise FileNotFoundError(f"--batch-file: no such file {path}") from None
    lines: list[tuple[int, BatchLine]] = []
    seen: set[str] = set()
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            line = BatchLine.model_validate(json.loads(raw))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} line {number}: not valid JSON ({e})") from None
        except ValidationError as e:
            problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'line'}: {err['msg']}" for err in e.errors())
            raise ValueError(f"{path} line {number}: {problems}") from None
        rid = line.id if line.id is not None else f"line-{number}"
        if rid in seen:
            raise ValueError(f"{path} line {number}: id {rid!r} is used by an earlier line")
        seen.add(rid)
        lines.append((number, line.model_copy(update={"id": rid})))
    if not lines:
        raise ValueError(f"{path}: no prompts (one JSON object per line)")
    return lines


def _batch_file_help() -> str:
    sampling = list(BatchSampling.model_fields)
    others = [name for name in BatchLine.model_fields if name not in sampling]
    return (f"run every prompt of this JSONL file concurrently (one object per line, with exactly one of `prompt` "
            f"and `prompt_token_ids`; fields {', '.join(others)}, and {', '.join(sampling)} in place of the "
            f"flags); print one JSON result per line and the throughput")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gptoss-serve", description="Serve gpt-oss on Ray.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="serve the model: OpenAI HTTP API and gRPC on Ray Serve (Ctrl-C stops)")
    p.add_argument("config", nargs="?", help="app config YAML (default: the embedded default model)")
    p.add_argument("--checkpoint", help="overrides model.checkpoint")
    p.add_argument("--address", help="join this Ray cluster (`auto`: the one running on this machine) "
                                     "instead of starting one; default: $RAY_ADDRESS, else a new local Ray")
    p.add_argument("--host", help="overrides http.host (0.0.0.0: every interface)")
    p.add_argument("--http-port", type=int, help="overrides http.port (default 8000)")
    p.add_argument("--grpc-port", type=int, help="overrides grpc.port (default 9000)")
    ingress = p.add_mutually_exclusive_group()
    ingress.add_argument("--direct-ingress", dest="direct_ingress", action="store_const", const=True, default=None,
                         help="gateway.direct_ingress true: the gateway replicas serve the ports themselves, no Serve "
                              "proxy (the default with one gateway replica)")
    ingress.add_argument("--serve-proxy", dest="direct_ingress", action="store_const", const=False,
                         help="gateway.direct_ingress false: clients reach the gateway through Serve's proxies")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("batch", help="run a file of chats or token-id prompts on Ray Data (resumable)")
    p.add_argument("--config", help="app config YAML: model, group, engine and its batch section "
                                    "(default: the embedded default model)")
    p.add_argument("--input", required=True, help="JSONL or Parquet rows: id, messages or prompt_token_ids, "
                                                  "sampling fields")
    p.add_argument("--output", required=True, help="folder of result parts; a rerun skips the ids there")
    p.add_argument("--output-format", choices=("jsonl", "parquet"), default="jsonl")
    p.add_argument("--rows-per-part", type=int, default=256, help="result rows per part file (a crash loses at "
                                                                  "most the rows not yet in a part)")
    p.add_argument("--checkpoint", help="overrides model.checkpoint")
    p.add_argument("--address", help="join this Ray cluster instead of starting one (default: $RAY_ADDRESS, "
                                     "else a new local Ray)")
    p.set_defaults(func=cmd_batch)

    p = sub.add_parser("checkpoint", help="write a random-weight checkpoint in the released layout")
    p.add_argument("--preset", default="tiny", help="tiny, small, gpt-oss-20b or gpt-oss-120b")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layout", choices=("hf", "original"), default="hf")
    p.set_defaults(func=cmd_checkpoint)

    p = sub.add_parser("kernels", help="how the compiled CPU kernels run here; --prebuild them for an image")
    p.add_argument("--prebuild", metavar="DIR", help="build every kernel for every portable x86-64 level into DIR "
                                                     "(then set GPTOSS_KERNELS_DIR=DIR where they run)")
    p.set_defaults(func=cmd_kernels)

    p = sub.add_parser("generate", help="chat with the model from the command line")
    p.add_argument("--checkpoint", help="checkpoint folder (default: the embedded random tiny model)")
    p.add_argument("--prompt", default="What is the capital of France?", help="the user message")
    p.add_argument("--system", help="system (developer) instructions")
    p.add_argument("--reasoning-effort", choices=("low", "medium", "high"), default="medium")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    p.add_argument("--device", default="cpu")
    p.add_argument("--packed-experts", choices=sorted(PACKED_EXPERTS), default="auto",
                   help="keep experts MXFP4 (4.25 bits/weight) in memory; auto: on CPU where the MXFP4 "
                        "kernel builds (faster), elsewhere only if dequantized they would not fit the free memory")
    p.add_argument("--skip-memory-check", action="store_true",
                   help="load even if the weights look too big for the free memory")
    p.add_argument("--show-analysis", action="store_true", help="also print the analysis channel")
    p.add_argument("--top-k", type=int, default=0, help="0 keeps every token")
    p.add_argument("--batch-file", metavar="PROMPTS_JSONL",
                   help=_batch_file_help())
    p.add_argument("--max-num-seqs", type=int, default=64, help="engine: most requests in one step")
    p.add_argument("--kv-cache-mib", type=int, default=1024, help="engine: KV cache budget")
    p.add_argument("--greedy-screen", action="store_true",
                   help="engine: greedy tokens by the 7-bit screen of the unembedding (CPU; exact, keeps a copy)")
    p.set_defaults(func=cmd_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    from gptoss.errors import GptossError

    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"gptoss-serve {args.command}: error: {e}", file=sys.stderr)
        return 2
    except GptossError as e:  # a server-side fault (a broken checkpoint, ...): said plainly, no traceback
        print(f"gptoss-serve {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
