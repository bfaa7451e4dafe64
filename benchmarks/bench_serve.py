"""What serving costs: streaming chat requests over HTTP (OpenAI API) and gRPC at 1 / 8 / 32 concurrent
clients against one model server replica (G=1), next to the bare EP group driven in this process, in
the same run, on the same checkpoint and prompts (greedy, fixed output length).

    .venv/bin/python benchmarks/bench_serve.py [--concurrency 1 8 32] [--max-tokens 64] [--json]

Per side and concurrency: output tokens/s, TTFT p50/p99, inter-token latency p50/p99 (a chunk of k
tokens after a gap g counts as k gaps of g/k), and the serving overhead against the group. The clients
run in this process (aiohttp for HTTP/SSE, grpc.aio for gRPC).

Cores: the rank runs on half the cores, pinned, and everything else (the serving path, Ray, the clients)
on the other half, on both sides (group and serving): on a GPU node the engine does not run on the
serving path's cores, and a rank sharing them made what serving costs look like what the rank lost to
it. `--engine-cores N` gives the rank N cores; `--engine-cores 0` lets everything share every core.

Where the CPU goes: for each measurement, the CPU time (user + system, from /proc) each kind of
process spent, per streamed token: the Serve proxy, the gateway replica (with its admission workers),
the model server replica, the rank actor, Ray's own processes (raylet, GCS, Serve controller, ...), and
the clients (this process). The serving path is proxy + gateway + model server: what a GPU node's
cores pay per token beside the engine. `--preset tiny` makes the engine cheap enough to show the path.

The clients reach the gateway replica's own ports (Serve's direct ingress, what `gptoss-serve serve`
starts with one gateway replica); `--serve-proxy`: they go through Serve's proxies
(gateway.direct_ingress false). `--no-token-channel`: every chunk comes to the gateway in its Serve call
(gateway.token_channel off), as before the channel. Every side (group, HTTP, gRPC) runs its questions once
unmeasured before the measured round on the same questions: a rank's first prefill of a prompt length
is slower, which otherwise fell on whichever side came first.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import time
from pathlib import Path

from bench_common import local_ray_env  # noqa: E402

local_ray_env()

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402
import grpc  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402
from bench_common import checkpoint_or_default, git_revision  # noqa: E402
from bench_stream import Trace, free_port, summary  # noqa: E402

from cluster import EPGroup  # noqa: E402
from engine.sampling_params import SamplingParams  # noqa: E402
from gptoss.harmony import ChatMessage  # noqa: E402
from serve.admission import ToolChoice, render_chat  # noqa: E402
from serve.cli import direct_ingress_environment  # noqa: E402
from serve.config import parse_config  # noqa: E402
from serve.proto.gptoss.v1 import gptoss_pb2 as pb  # noqa: E402
from serve.proto.gptoss.v1 import gptoss_pb2_grpc as pb_grpc  # noqa: E402

WORDS = ("model serving expert parallel token cache group rank stream latency throughput gateway router "
         "kernel memory request batch prefix window attention sink router gate").split()


def make_questions(n: int, seed: int) -> list[str]:
    gen = torch.Generator().manual_seed(seed)
    return [" ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (int(torch.randint(8, 120, (1,),
                                                                                            generator=gen)),),
                                                                    generator=gen)) for _ in range(n)]


PROCESS_KINDS = (("proxy", "ray::ProxyActor"), ("gateway", "ray::ServeReplica:bench:Gateway"),
                 ("model_server", "ray::ServeReplica:bench:ModelServer"), ("rank", "ray::RankActor"))
SERVING_PATH = ("proxy", "gateway", "model_server")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def process_kind(pid: int, command: str) -> str | None:
    """Which kind of process `pid` is (None: not ours, nor Ray's)."""
    if pid == os.getpid():
        return "clients"
    for kind, prefix in PROCESS_KINDS:
        if command.startswith(prefix):
            return kind
    if "serve.admission_workers" in command:
        return "gateway"  # the gateway's admission worker processes
    if command.startswith("ray::") or any(name in command for name in ("raylet", "gcs_server", "ray/dashboard",
                                                                       "log_monitor", "runtime_env")):
        return "ray"
    return None


def our_processes():
    """(pid, kind, /proc entry) of every live process that is ours or Ray's."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:  # it exited meanwhile
            continue
        kind = process_kind(int(entry.name), command)
        if kind is not None:
            yield int(entry.name), kind, entry


def cpu_seconds_by_kind() -> dict[str, float]:
    """CPU seconds (user + system) every live process has used so far, summed per kind."""
    totals: dict[str, float] = {}
    for _, kind, entry in our_processes():
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # it exited meanwhile
            continue
        totals[kind] = totals.get(kind, 0.0) + (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    return totals


def split_cores(engine_cores: int) -> tuple[set[int], set[int]]:
    """(the rank's cores, everyone else's): the first `engine_cores` of this process's cores for the rank
    and the rest for the serving path, Ray and the clients; 0 (or as many as there are): all share all."""
    cores = sorted(os.sched_getaffinity(0))
    if engine_cores == 0 or engine_cores >= len(cores):  # (one core: nothing to split)
        return set(cores), set(cores)
    return set(cores[:engine_cores]), set(cores[engine_cores:])


def pin_threads(pid: int, cores: set[int]) -> None:
    """Every thread of `pid` onto `cores` (threads it starts later inherit the mask)."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            os.sched_setaffinity(int(task.name), cores)
        except (ProcessLookupError, FileNotFoundError):  # the thread ended meanwhile
            pass


def pin_ranks(cores: set[int]) -> None:
    """The rank actors onto the engine's cores. They start on the others: Ray forks its workers from the
    raylet, which inherited this process's mask."""
    for pid, kind, _ in our_processes():
        if kind == "rank":
            pin_threads(pid, cores)


def cpu_ms_per_token(before: dict[str, float], after: dict[str, float], tokens: int) -> dict[str, float]:
    """Milliseconds of CPU per streamed token, per kind and for the serving path."""
    per = {kind: max(0.0, after.get(kind, 0.0) - before.get(kind, 0.0)) * 1000 / max(tokens, 1)
           for kind in ("proxy", "gateway", "model_server", "rank", "ray", "clients")}
    return per | {"serving_path": sum(per[k] for k in SERVING_PATH)}


async def drive(one_request, questions: list[str], concurrency: int) -> dict:
    """`concurrency` clients, each sending its share of the questions one after another."""
    traces: list[Trace] = []
    queue = list(questions)

    async def client():
        while queue:
            question = queue.pop()
            trace = Trace()
            await one_request(question, trace)
            traces.append(trace)

    cpu_before = cpu_seconds_by_kind()
    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    result = summary(traces, time.perf_counter() - start)
    return result | {"cpu_ms_per_token": cpu_ms_per_token(cpu_before, cpu_seconds_by_kind(), result["tokens"])}


async def measure(one_request, concurrency: int, per_client: int, seed: int) -> dict:
    """`per_client` requests per client, and at least 16 in all (so a p50 at one client is a median of
    something), after a warm-up round on the same questions: a rank's first prefill of a prompt length is
    slower, so without it the side measured first (the group, then HTTP) paid for lengths the next one
    (gRPC) found warm, ~6-10 ms of TTFT at one client. Prefix caching is off, so nothing else carries over."""
    questions = make_questions(max(16, concurrency * per_client), seed)
    await drive(one_request, questions, concurrency)
    return await drive(one_request, questions, concurrency)


def chat_prompt(question: str) -> list[int]:
    prompt, _ = render_chat([ChatMessage("user", question)], [], ToolChoice("none"), "low")
    return list(prompt)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", help="default: a random checkpoint of --preset written once to the cache")
    parser.add_argument("--preset", default="small", help="the random checkpoint's preset (tiny: a cheap engine)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--stream-interval-ms", type=float, default=0.0, help="model_server.stream_interval_ms")
    parser.add_argument("--merge-streams-per-token", type=int, default=None,
                        help="model_server.stream_merge_streams_per_token (default: the config's; 0: off)")
    parser.add_argument("--merge-max-wait-ms", type=float, default=None,
                        help="model_server.stream_merge_max_wait_ms (default: the config's)")
    parser.add_argument("--serve-proxy", action="store_true",
                        help="gateway.direct_ingress false: clients go through Serve's proxies, not to the gateway "
                             "replica's own ports")
    parser.add_argument("--no-token-channel", action="store_true",
                        help="gateway.token_channel off: every chunk is a Ray message in its Serve call")
    parser.add_argument("--engine-cores", type=int, default=None,
                        help="cores of the rank's own, the rest for the serving path, Ray and the clients "
                             "(default: half; 0: all share all cores)")
    parser.add_argument("--json", action="store_true", help="last line: one JSON object with the figures")
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0))
    if args.engine_cores is not None and not 0 <= args.engine_cores < cores:
        parser.error(f"--engine-cores {args.engine_cores}: give 0 (all share) or 1 to {cores - 1} of the {cores} "
                     f"cores this process may use")

    checkpoint = checkpoint_or_default(args.checkpoint, args.preset)
    engine_cores, other_cores = split_cores(cores // 2 if args.engine_cores is None else args.engine_cores)
    config = parse_config({
        "model": {"checkpoint": checkpoint, "dtype": "float32", "packed_experts": False, "name": "bench"},
        "group": {"num_ranks": 1, "device": "cpu", "num_cpus_per_rank": len(engine_cores)},
        "engine": {"max_num_seqs": 64, "max_num_batched_tokens": 2048, "kv_cache_gib": 1.0,
                   "enable_prefix_caching": False},
        "model_server": {"num_cpus": 0.01, "stream_interval_ms": args.stream_interval_ms} | {
            key: value for key, value in (("stream_merge_streams_per_token", args.merge_streams_per_token),
                                          ("stream_merge_max_wait_ms", args.merge_max_wait_ms)) if value is not None},
        "gateway": {"num_cpus": 0, "token_channel": not args.no_token_channel,
                    "direct_ingress": not args.serve_proxy},
    })
    sampling = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, stop_token_ids=())
    print(f"# bench_serve  rev {git_revision()}  {platform.machine()} {cores} cores  torch {torch.__version__}  "
          f"ray {ray.__version__}")
    print(f"# checkpoint {checkpoint} (float32), G=1, greedy, {args.max_tokens} tokens per request, chat prompts "
          f"of 8-120 words; {args.requests_per_client} requests per client (16 at least), each side after a "
          f"warm-up round on the same questions")
    if engine_cores == other_cores:
        print(f"# the rank, the serving path, Ray and the clients share all {cores} cores")
    else:  # as on a GPU node, where the engine does not run on the serving path's cores
        print(f"# the rank runs on cores {sorted(engine_cores)}; the serving path, Ray and the clients on "
              f"{sorted(other_cores)}")
        pin_threads(os.getpid(), other_cores)  # Ray's processes, started below, inherit the mask

    # Logical CPUs for scheduling only: the rank takes its cores, the replica and gateway bundles a sliver.
    ports = (free_port(), free_port())  # the clients': Serve's proxies, or the gateway replica itself
    proxy_ports = ports
    if not args.serve_proxy:  # read at import by every Serve process: set before the cluster starts
        proxy_ports = direct_ingress_environment(parse_config({"http": {"port": ports[0]}, "grpc": {"port": ports[1]}}))
    ray.init(num_cpus=cores + 1, include_dashboard=False, log_to_driver=False)
    results: dict[tuple[str, int], dict] = {}
    try:
        asyncio.run(bench_group(config, sampling, args, results, engine_cores))
        asyncio.run(bench_endpoints(config, args, results, ports, proxy_ports, engine_cores))
    finally:
        from ray import serve

        serve.shutdown()
        ray.shutdown()
    return report(results, args, engine_cores if engine_cores != other_cores else set())


async def bench_group(config, sampling: SamplingParams, args, results: dict, engine_cores: set[int]) -> None:
    group = EPGroup(config.group_config(config.checkpoint_path(), name="bench-group"))
    await group.start()
    pin_ranks(engine_cores)
    ids = iter(range(10**9))

    async def one(question: str, trace: Trace) -> None:
        async for out in group.generate(f"q{next(ids)}", chat_prompt(question), sampling):
            trace.tokens(len(out.new_token_ids))

    try:
        for n in args.concurrency:
            results[("group", n)] = await measure(one, n, args.requests_per_client, seed=n)
    finally:
        await group.shutdown()


async def bench_endpoints(config, args, results: dict, ports: tuple[int, int], proxy_ports: tuple[int, int],
                          engine_cores: set[int]) -> None:
    from ray import serve
    from ray.serve.config import HTTPOptions, gRPCOptions

    from serve.app import GRPC_SERVICER_FUNCTIONS, build_app_from_config

    serve.start(http_options=HTTPOptions(host="127.0.0.1", port=proxy_ports[0]),
                grpc_options=gRPCOptions(port=proxy_ports[1], grpc_servicer_functions=GRPC_SERVICER_FUNCTIONS))
    serve.run(build_app_from_config(config), name="bench", route_prefix="/")
    pin_ranks(engine_cores)
    http_port, grpc_port = ports
    url = f"http://127.0.0.1:{http_port}/v1/chat/completions"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600),
                                     connector=aiohttp.TCPConnector(limit=0)) as session, \
            grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        stub = pb_grpc.GptossServiceStub(channel)

        async def over_http(question: str, trace: Trace) -> None:
            body = {"model": "bench", "messages": [{"role": "user", "content": question}], "stream": True,
                    "max_tokens": args.max_tokens, "temperature": 0, "reasoning_effort": "low",
                    "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
            seen = 0
            async with session.post(url, json=body) as response:
                async for line in response.content:
                    if line.startswith(b"data: {"):
                        usage = json.loads(line[6:]).get("usage")
                        if usage:
                            trace.tokens(usage["completion_tokens"] - seen)
                            seen = usage["completion_tokens"]

        async def over_grpc(question: str, trace: Trace) -> None:
            request = pb.GenerateRequest(chat=pb.Chat(messages=[pb.ChatMessage(role="user", content=question)],
                                                      reasoning_effort="low"),
                                         sampling=pb.SamplingParams(max_tokens=args.max_tokens, temperature=0))
            async for reply in stub.Generate(request):
                trace.tokens(len(reply.token_ids))

        for n in args.concurrency:  # the two APIs alternate at each level
            results[("http", n)] = await measure(over_http, n, args.requests_per_client, seed=n)
            results[("grpc", n)] = await measure(over_grpc, n, args.requests_per_client, seed=n)


def config_defaults_or(args) -> tuple[int, float]:
    """The merging the run used: the flags, else the config's defaults."""
    from serve.config import ModelServerSection

    defaults = ModelServerSection()
    return (args.merge_streams_per_token if args.merge_streams_per_token is not None
            else defaults.stream_merge_streams_per_token,
            args.merge_max_wait_ms if args.merge_max_wait_ms is not None else defaults.stream_merge_max_wait_ms)


def report(results: dict, args, engine_cores: set[int]) -> int:
    """Prints the tables (and the JSON line); `engine_cores`: the rank's own cores, empty if shared."""
    ms = config_defaults_or(args)
    print(f"# merging: a chunk waits for 1 + open streams // {ms[0]} tokens, at most {ms[1]:g} ms "
          f"(model_server.stream_merge_*)")
    print(f"# token channel {'off' if args.no_token_channel else 'on'}; clients reach "
          f"{'Serve proxies' if args.serve_proxy else 'the gateway replica itself (direct ingress)'}")
    print(f"{'side':<7}{'clients':>8}{'tokens/s':>10}{'vs group':>10}{'TTFT p50':>10}{'p99':>8}{'ITL p50':>9}"
          f"{'p99':>8}{'+TTFT p50':>11}{'tok/chunk':>10}{'chunk gap p99':>14}")
    rows = []
    for (side, n), r in sorted(results.items(), key=lambda item: (item[0][1], item[0][0] != "group", item[0][0])):
        base = results[("group", n)]
        r["vs_group"] = r["tokens_per_s"] / base["tokens_per_s"]
        r["ttft_overhead_p50_ms"] = r["ttft_p50_ms"] - base["ttft_p50_ms"]
        print(f"{side:<7}{n:>8}{r['tokens_per_s']:>10.1f}{r['vs_group']:>9.2f}x{r['ttft_p50_ms']:>10.1f}"
              f"{r['ttft_p99_ms']:>8.1f}{r['itl_p50_ms']:>9.1f}{r['itl_p99_ms']:>8.1f}{r['ttft_overhead_p50_ms']:>+11.1f}"
              f"{r['tokens_per_chunk']:>10.2f}{r['chunk_gap_p99_ms']:>14.1f}")
        rows.append({"side": side, "concurrency": n} | r)
    print("(ms; +TTFT: serving minus the bare group at the same concurrency)")
    kinds = ("proxy", "gateway", "model_server", "serving_path", "rank", "ray", "clients")
    print("CPU ms per streamed token, by process kind (serving_path = proxy + gateway + model_server):")
    print(f"{'side':<7}{'clients':>8}" + "".join(f"{k:>14}" for k in kinds))
    for row in rows:
        cpu = row["cpu_ms_per_token"]
        print(f"{row['side']:<7}{row['concurrency']:>8}" + "".join(f"{cpu[k]:>14.3f}" for k in kinds))
    if args.json:
        low = min(args.concurrency)
        figures = {f"{api}_vs_group_at_{n}": results[(api, n)]["vs_group"]
                   for n in args.concurrency for api in ("http", "grpc")}
        figures |= {f"serve_cpu_ms_per_token_{api}_at_{n}": results[(api, n)]["cpu_ms_per_token"]["serving_path"]
                    for n in args.concurrency for api in ("http", "grpc")}
        print(json.dumps({
            "benchmark": "bench_serve", "git": git_revision(), "direct_ingress": not args.serve_proxy,
            "token_channel": not args.no_token_channel, "engine_cores": sorted(engine_cores),
            "ttft_overhead_p50_ms": max(results[("http", low)]["ttft_overhead_p50_ms"],
                                        results[("grpc", low)]["ttft_overhead_p50_ms"]),
        } | figures | {"results": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
