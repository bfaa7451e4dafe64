"""Streams that survive their group: two EP groups (G=1) behind one gateway, 32 concurrent greedy streaming
clients (HTTP and gRPC mixed, 128 tokens each); during the run one group's rank is killed (SIGKILL), then
Serve's autoscaler removes a group (scale-down) and adds one back (scale-up). Three runs on the same
prompts: with migration (gateway.max_migrations 3), without (0), and undisturbed (the baseline: two
fixed groups, no kill, the same client load over time).

    .venv/bin/python benchmarks/bench_failover.py [--requests 192] [--clients 32] [--preset small] [--json]

The load drives the autoscaler (target_ongoing_requests is 0.75x the clients): all clients want two
groups; once the killed group is back, half the clients pause, so one group is enough and the autoscaler
removes one (downscale_delay_s 12 s; the removed replica drains its streams after drain_grace_s 2 s);
then the paused clients come back and it adds one. Clients keep taking prompts until that is over and
at least --requests have run.

Reports per disturbed run: requests lost (client-visible errors), token identity with the undisturbed
run, the pause a moved stream's client saw (the longest gap of each stream that ran through a
disturbance, p50/p99; and the gateway's gptoss_migration_resume_seconds), and tokens/s against the
undisturbed run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import sys
import time
import urllib.request
from pathlib import Path

from bench_common import local_ray_env  # noqa: E402

local_ray_env()

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402
import grpc  # noqa: E402
import ray  # noqa: E402
from bench_common import checkpoint_or_default, git_revision  # noqa: E402
from bench_stream import free_port  # noqa: E402

from serve.config import parse_config  # noqa: E402
from serve.proto.gptoss.v1 import gptoss_pb2 as pb  # noqa: E402
from serve.proto.gptoss.v1 import gptoss_pb2_grpc as pb_grpc  # noqa: E402

MODEL = "failover"
DRAIN_GRACE_S = 2.0
# Ray 2.60's autoscaler read 0 ongoing requests right after a rank was killed (with 32 streams open) and,
# with a 4 s downscale delay, removed the healthy group, so that no group served until the failed one was
# replaced (~6-8 s). A delay longer than that reading lasts lets the run measure the failure itself; the
# default downscale_delay_s (600 s) is far longer.
DOWNSCALE_DELAY_S = 12


def app_config(checkpoint: str, max_migrations: int, clients: int, autoscaled: bool):
    scaling = {"autoscaling": {"min_replicas": 1, "max_replicas": 2, "initial_replicas": 2,
                               "target_ongoing_requests": clients * 0.75, "upscale_delay_s": 1,
                               "downscale_delay_s": DOWNSCALE_DELAY_S, "look_back_period_s": 2}} if autoscaled \
        else {"num_replicas": 2}
    return parse_config({
        "model": {"checkpoint": checkpoint, "name": MODEL, "dtype": "float32"},
        "group": {"num_ranks": 1, "device": "cpu", "step_timeout_s": 30},
        "engine": {"max_num_seqs": 64, "kv_cache_gib": 0.25, "max_model_len": 1024},
        "model_server": {"num_cpus": 0.1, "graceful_shutdown_timeout_s": 10, "drain_grace_s": DRAIN_GRACE_S,
                         "health_check_period_s": 1, "stats_period_s": 1, **scaling},
        "gateway": {"num_cpus": 0.1, "max_migrations": max_migrations}})


def prompt(index: int) -> list[int]:
    rng = random.Random(index)
    return [rng.randrange(1000, 199000) for _ in range(rng.randrange(16, 64))]


class Outcome:
    def __init__(self) -> None:
        self.tokens: list[int] | str = []  # gRPC: token ids; HTTP: the text
        self.error: str | None = None
        self.gaps_s: list[float] = []
        self.start = self.end = 0.0


async def one_http(session, url: str, tokens: list[int], max_tokens: int) -> Outcome:
    outcome, last = Outcome(), None
    outcome.start, outcome.tokens = time.monotonic(), ""
    body = {"model": MODEL, "prompt": tokens, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    try:
        async with session.post(f"{url}/v1/completions", json=body) as response:
            if response.status != 200:
                outcome.error = f"HTTP {response.status}: {(await response.text())[:200]}"
            async for raw in response.content:
                line = raw.strip()
                if not line.startswith(b"data: {"):
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    outcome.error = event["error"]["message"]
                for choice in event.get("choices", []):
                    outcome.tokens += choice["text"]
                    now = time.monotonic()
                    if last is not None:
                        outcome.gaps_s.append(now - last)
                    last = now
    except aiohttp.ClientError as e:
        outcome.error = f"{type(e).__name__}: {e}"
    outcome.end = time.monotonic()
    return outcome


async def one_grpc(stub, tokens: list[int], max_tokens: int) -> Outcome:
    outcome, last = Outcome(), None
    outcome.start = time.monotonic()
    request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=tokens),
                                 sampling=pb.SamplingParams(max_tokens=max_tokens, temperature=0))
    try:
        async for reply in stub.Generate(request, timeout=600):
            if reply.token_ids:
                now = time.monotonic()
                if last is not None:
                    outcome.gaps_s.append(now - last)
                last = now
            outcome.tokens += reply.token_ids
    except grpc.aio.AioRpcError as e:
        outcome.error = f"{e.code().name}: {e.details()}"
    outcome.end = time.monotonic()
    return outcome


class Load:
    """The clients' side of a run: `clients` loops taking prompt after prompt (odd indices over gRPC,
    even over HTTP, in every run); the second half of them pause while `full` is clear."""

    def __init__(self, clients: int, min_requests: int) -> None:
        self.clients, self.min_requests = clients, min_requests
        self.full = asyncio.Event()
        self.full.set()
        self.schedule_done = False
        self.outcomes: dict[int, Outcome] = {}
        self.next_index = 0
        self.start = time.monotonic()
        self.events: list[tuple[str, float]] = []

    def mark(self, event: str) -> None:
        self.events.append((event, time.monotonic() - self.start))
        print(f"  {self.events[-1][1]:6.1f} s  {event}", flush=True)

    async def client(self, number: int, http: str, stub, session, max_tokens: int) -> None:
        while not self.schedule_done or self.next_index < self.min_requests:
            if number >= self.clients // 2:
                await self.full.wait()
            index, self.next_index = self.next_index, self.next_index + 1
            run = one_grpc(stub, prompt(index), max_tokens) if index % 2 else \
                one_http(session, http, prompt(index), max_tokens)
            self.outcomes[index] = await run


async def drive(http: str, grpc_address: str, load: Load, max_tokens: int, schedule) -> float:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session, \
            grpc.aio.insecure_channel(grpc_address) as channel:
        stub = pb_grpc.GptossServiceStub(channel)
        load.start = time.monotonic()
        clients = [asyncio.create_task(load.client(i, http, stub, session, max_tokens)) for i in range(load.clients)]
        try:
            await schedule(load)
        finally:
            load.schedule_done = True
            load.full.set()
        await asyncio.gather(*clients)
        return time.monotonic() - load.start


def rank_pids() -> set[int]:
    pids = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "cmdline").read_bytes().startswith(b"ray::RankActor"):
                    pids.add(int(entry.name))
            except OSError:
                continue
    return pids


def model_servers_running(app: str) -> int:
    from ray import serve

    deployment = serve.status().applications[app].deployments["ModelServer"]
    return sum(n for state, n in deployment.replica_states.items() if str(getattr(state, "value", state)) == "RUNNING")


async def until(condition, timeout_s: float = 180.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("the fleet did not reach the expected state in time")
        await asyncio.sleep(0.25)


def disturbing_schedule(app: str):
    async def schedule(load: Load) -> None:
        await asyncio.sleep(3.0)
        victim = min(rank_pids())
        os.kill(victim, signal.SIGKILL)
        load.mark("rank killed")
        # Back when a new rank runs in place of the killed one and both replicas serve.
        await until(lambda: len(rank_pids() - {victim}) == 2 and model_servers_running(app) == 2)
        load.mark("group back")
        await asyncio.sleep(2.0)
        load.full.clear()
        load.mark("half the clients pause")
        await until(lambda: model_servers_running(app) == 1)
        load.mark("scaled down")
        await asyncio.sleep(DRAIN_GRACE_S + 3.0)  # the removed replica's streams have moved
        load.full.set()
        load.mark("clients back")
        await until(lambda: model_servers_running(app) == 2)
        load.mark("scaled up")
        await asyncio.sleep(3.0)

    return schedule


def replayed_schedule(events: list[tuple[str, float]]):
    """The disturbed run's client load over time, without the kill or the autoscaler."""
    async def schedule(load: Load) -> None:
        for event, at in events:
            await asyncio.sleep(max(0.0, at - (time.monotonic() - load.start)))
            if event == "half the clients pause":
                load.full.clear()
            elif event == "clients back":
                load.full.set()
            load.mark(event if event in ("half the clients pause", "clients back") else f"({event})")
        await asyncio.sleep(3.0)

    return schedule


def run_once(checkpoint: str, app: str, args, schedule, min_requests: int, max_migrations: int = 3,
             autoscaled: bool = True) -> dict:
    from ray import serve

    from serve.app import build_app_from_config

    print(f"{app}:", flush=True)
    serve.run(build_app_from_config(app_config(checkpoint, max_migrations, args.clients, autoscaled)), name=app,
              route_prefix=f"/{app}")
    while model_servers_running(app) != 2:
        time.sleep(0.5)
    url = f"http://127.0.0.1:{args.http_port}/{app}"
    try:
        load = Load(args.clients, min_requests)
        wall = asyncio.run(drive(url, f"127.0.0.1:{args.grpc_port}", load, args.max_tokens, schedule))
        page = ""
        if max_migrations and autoscaled:
            time.sleep(3)  # Ray's exporter reports every second or two
            page = urllib.request.urlopen(f"{url}/metrics", timeout=30).read().decode()
    finally:
        serve.delete(app)
    return {"outcomes": load.outcomes, "wall_s": wall, "events": load.events, "metrics": page}


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def resume_quantiles(page: str) -> tuple[float, float]:
    """Upper bounds of the buckets holding p50 / p99 of gptoss_migration_resume_seconds, summed over the
    page's series."""
    counts: dict[float, float] = {}
    for line in page.splitlines():
        if line.startswith("ray_gptoss_migration_resume_seconds_bucket"):
            le = line.split('le="', 1)[1].split('"', 1)[0]
            bound = float("inf") if le == "+Inf" else float(le)
            counts[bound] = counts.get(bound, 0.0) + float(line.rsplit(" ", 1)[1])
    if not counts or not max(counts.values()):
        return float("nan"), float("nan")
    total = max(counts.values())
    return tuple(next(b for b in sorted(counts) if counts[b] >= q * total) for q in (0.5, 0.99))


def disturbances(events: list[tuple[str, float]]) -> list[tuple[float, float]]:
    """The windows in which streams were moved: the kill until the group was back, and the load drop
    (the scale-down and its drain) until the clients came back."""
    at = dict(events)
    return [(at["rank killed"], at["group back"]), (at["half the clients pause"], at["clients back"])]


def figures(run: dict, base: dict) -> dict:
    outcomes, expected = run["outcomes"], base["outcomes"]
    lost = [o for o in outcomes.values() if o.error]
    compared = [i for i, o in outcomes.items() if not o.error and i in expected and not expected[i].error]
    identical = sum(outcomes[i].tokens == expected[i].tokens for i in compared)
    start = min(o.start for o in outcomes.values())
    windows = disturbances(run["events"])
    # Streams that ran through a disturbance: their longest gap is the pause their client saw.
    hit = [max(o.gaps_s, default=0.0) for o in outcomes.values()
           if not o.error and any(o.start - start < end and o.end - start > begin for begin, end in windows)]
    tokens = sum(len(o.tokens) for o in outcomes.values())
    return {"requests": len(outcomes), "lost": len(lost), "lost_before_first_token": sum(not o.tokens for o in lost),
            "compared": len(compared), "identical": identical,
            "streams_hit": len(hit), "pause_p50_s": quantile(hit, 0.5), "pause_p99_s": quantile(hit, 0.99),
            "tokens_per_s": tokens / run["wall_s"], "events": run["events"],
            "errors": sorted({o.error[:110] for o in lost})[:4]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=192, help="at least this many streams per run")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--preset", default="small", help="the random checkpoint's preset (tiny, small)")
    parser.add_argument("--checkpoint", help="a checkpoint folder instead of a random one")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    from gptoss.writer import cached_random_checkpoint

    checkpoint = args.checkpoint or (checkpoint_or_default(None) if args.preset == "small"
                                     else str(cached_random_checkpoint(args.preset, seed=0)))
    ray.init(num_cpus=max(6, os.cpu_count() or 2), include_dashboard=False, log_to_driver=False)
    from ray import serve
    from ray.serve.config import HTTPOptions, gRPCOptions

    from serve.app import GRPC_SERVICER_FUNCTIONS

    args.http_port, args.grpc_port = free_port(), free_port()
    serve.start(http_options=HTTPOptions(host="127.0.0.1", port=args.http_port),
                grpc_options=gRPCOptions(port=args.grpc_port, grpc_servicer_functions=GRPC_SERVICER_FUNCTIONS))
    try:
        moved = run_once(checkpoint, "migrating", args, disturbing_schedule("migrating"), args.requests)
        cut = run_once(checkpoint, "not-migrating", args, disturbing_schedule("not-migrating"), args.requests,
                       max_migrations=0)
        base = run_once(checkpoint, "undisturbed", args, replayed_schedule(moved["events"]),
                        max(len(moved["outcomes"]), len(cut["outcomes"])), autoscaled=False)
    finally:
        serve.shutdown()
        ray.shutdown()
    return report(base, moved, cut, args, checkpoint)


def report(base: dict, moved: dict, cut: dict, args, checkpoint: str) -> int:
    on, off = figures(moved, base), figures(cut, base)
    base_rate = sum(len(o.tokens) for o in base["outcomes"].values()) / base["wall_s"]
    resume_p50, resume_p99 = resume_quantiles(moved["metrics"])
    print(f"bench_failover @ {git_revision()}: greedy streams of {args.max_tokens} tokens, {args.clients} "
          f"clients (HTTP and gRPC), 2 groups (G=1) of {Path(checkpoint).name}; a rank killed, then a "
          f"scale-down and a scale-up")
    print(f"   undisturbed: {len(base['outcomes'])} streams, {sum(1 for o in base['outcomes'].values() if o.error)} "
          f"errors, {base_rate:.0f} tokens/s")
    for name, f in (("migration on", on), ("migration off", off)):
        print(f"{name:>14}: {f['requests']} streams, lost {f['lost']} ({f['lost_before_first_token']} before their "
              f"first token), identical tokens {f['identical']}/"
              f"{f['compared']}, pause of {f['streams_hit']} disturbed streams p50 {f['pause_p50_s']:.2f} s "
              f"p99 {f['pause_p99_s']:.2f} s, {f['tokens_per_s']:.0f} tokens/s "
              f"({f['tokens_per_s'] / base_rate:.2f}x undisturbed)")
        print(f"{'':>16}events {[(e, round(t, 1)) for e, t in f['events']]}")
        for error in f["errors"]:
            print(f"{'':>16}lost: {error}")
    print(f"gateway's gptoss_migration_resume_seconds (migration on): p50 <= {resume_p50} s, p99 <= {resume_p99} s")
    if args.json:
        print(json.dumps({"lost_requests": on["lost"], "lost_requests_without_migration": off["lost"],
                          "identical_tokens": on["identical"] == on["compared"], "pause_p50_s": on["pause_p50_s"],
                          "pause_p99_s": on["pause_p99_s"],
                          "tokens_per_s_vs_undisturbed": on["tokens_per_s"] / base_rate,
                          "revision": git_revision()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
