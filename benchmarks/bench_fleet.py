"""Routing across a fleet: two EP groups (G=1 each) behind one gateway, a multi-turn chat workload whose
conversations each keep a long prefix (their own system prompt and history), at 16 and 64 concurrent
clients, with our prefix-affinity router against Ray Serve's default power-of-two router, in the same
run on the same checkpoint and conversations.

    .venv/bin/python benchmarks/bench_fleet.py [--concurrency 16 64] [--turns 4] [--json]

Per router and concurrency: output tokens/s, TTFT p50/p99, and the prefix-cache hit rate (cached
prompt tokens / prompt tokens, from each reply's usage). The clients (aiohttp, streaming chat over
HTTP) share the cores with the server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import sys
from pathlib import Path

from bench_common import local_ray_env  # noqa: E402

local_ray_env()

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402
from bench_common import checkpoint_or_default, git_revision  # noqa: E402
from bench_stream import Trace, free_port, summary  # noqa: E402

from serve.config import parse_config  # noqa: E402

WORDS = ("model serving expert parallel token cache group rank stream latency throughput gateway router "
         "kernel memory request batch prefix window attention sink gate harmony channel analysis").split()
POLICIES = ("power_of_two", "prefix_affinity")


def conversation_script(seed: int, turns: int, system_words: int, turn_words: tuple[int, int]
                        ) -> tuple[str, list[str]]:
    """A conversation's own system prompt and its user turns (each turn a passage of turn_words words)."""
    rng = random.Random(seed)
    system = " ".join(rng.choice(WORDS) for _ in range(system_words))
    return system, [" ".join(rng.choice(WORDS) for _ in range(rng.randint(*turn_words))) for _ in range(turns)]


class Run:
    """One router at one concurrency: traces and prefix-cache counts of every request."""

    def __init__(self) -> None:
        self.traces: list[Trace] = []
        self.num_prompt_tokens = 0
        self.num_cached_tokens = 0
        self.failures = 0


async def converse(session: aiohttp.ClientSession, url: str, script, max_tokens: int, think_s: tuple[float, float],
                   rng: random.Random, run: Run) -> None:
    system, turns = script
    messages = [{"role": "system", "content": system}]
    for turn, user in enumerate(turns):
        if turn:  # the user reads the reply and writes the next turn: other conversations go on meanwhile
            await asyncio.sleep(rng.uniform(*think_s))
        messages.append({"role": "user", "content": user})
        body = {"model": "bench", "messages": messages, "stream": True, "max_tokens": max_tokens,
                "temperature": 0, "reasoning_effort": "low",
                "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
        trace, seen, usage, reply = Trace(), 0, None, []
        async with session.post(url, json=body) as response:
            if response.status != 200:
                run.failures += 1
                return
            async for line in response.content:
                if not line.startswith(b"data: {"):
                    continue
                event = json.loads(line[6:])
                usage = event.get("usage") or usage
                if usage and usage["completion_tokens"] > seen:
                    trace.tokens(usage["completion_tokens"] - seen)
                    seen = usage["completion_tokens"]
                for choice in event.get("choices", []):
                    reply.append(choice["delta"].get("content") or "")
        run.traces.append(trace)
        run.num_prompt_tokens += usage["prompt_tokens"]
        run.num_cached_tokens += usage["prompt_tokens_details"]["cached_tokens"]
        messages.append({"role": "assistant", "content": "".join(reply)})


async def drive(url: str, scripts: list, concurrency: int, max_tokens: int, think_s: tuple[float, float]) -> dict:
    """`concurrency` clients, each holding its conversations one after another (the think times are
    drawn from one seed per run, so both routers see the same arrivals)."""
    run = Run()
    queue = list(scripts)
    loop = asyncio.get_running_loop()
    rng = random.Random(concurrency)

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1800),
                                     connector=aiohttp.TCPConnector(limit=0)) as session:
        async def client():
            while queue:
                await converse(session, url, queue.pop(), max_tokens, think_s, rng, run)

        start = loop.time()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        wall_s = loop.time() - start
    result = summary(run.traces, wall_s)
    result["hit_rate"] = run.num_cached_tokens / max(1, run.num_prompt_tokens)
    result["requests"] = len(run.traces)
    result["failures"] = run.failures
    return result


def app_config(checkpoint: str, policy: str, args) -> dict:
    return {
        "model": {"checkpoint": checkpoint, "dtype": "float32", "packed_experts": False, "name": "bench"},
        "group": {"num_ranks": 1, "device": "cpu", "num_cpus_per_rank": 1},
        "engine": {"max_num_seqs": 64, "max_num_batched_tokens": 2048, "kv_cache_gib": args.kv_cache_gib},
        "model_server": {"num_replicas": 2, "num_cpus": 0.01, "router": {"policy": policy}, "stats_period_s": 1.0},
        "gateway": {"num_cpus": 0},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", help="default: a random `small` checkpoint written once to the cache")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--conversations-per-client", type=int, default=1)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--system-words", type=int, default=60, help="length of each conversation's system prompt")
    parser.add_argument("--turn-words", type=int, nargs=2, default=[100, 200], metavar=("MIN", "MAX"),
                        help="length of each user turn (a pasted passage)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--think-s", type=float, nargs=2, default=[0.5, 3.0], metavar=("MIN", "MAX"),
                        help="pause between a reply and the user's next turn (0 0: closed loop, where Serve's "
                             "queue-length choice sends a turn back to the group that just finished the last one)")
    parser.add_argument("--kv-cache-gib", type=float, default=0.1,
                        help="per group: about what the conversations' KV needs once across the fleet at 64 "
                             "clients, not twice")
    parser.add_argument("--json", action="store_true", help="last line: one JSON object with the figures")
    args = parser.parse_args()

    checkpoint = checkpoint_or_default(args.checkpoint)
    cores = os.cpu_count() or 1
    print(f"# bench_fleet  rev {git_revision()}  {platform.machine()} {cores} cores  torch {torch.__version__}  "
          f"ray {ray.__version__}")
    print(f"# checkpoint {checkpoint} (float32), 2 groups of G=1, greedy, {args.max_tokens} tokens per reply, "
          f"{args.turns}-turn chats ({args.system_words}-word system prompt, user turns of {args.turn_words[0]}-"
          f"{args.turn_words[1]} words, empty replies: random weights), {args.conversations_per_client} per "
          f"client, {args.think_s[0]:g}-{args.think_s[1]:g} s between turns; KV cache {args.kv_cache_gib} GiB per "
          f"group; both routers on the same conversations")

    from ray import serve
    from ray.serve.config import HTTPOptions

    from serve.app import build_app_from_config

    # Logical CPUs for scheduling: two apps of two one-CPU groups each stay deployed (one is busy at a time).
    ray.init(num_cpus=max(cores, 4) + 2, include_dashboard=False, log_to_driver=False)
    http_port = free_port()
    serve.start(http_options=HTTPOptions(host="127.0.0.1", port=http_port))
    results: dict[tuple[str, int], dict] = {}
    try:
        for policy in POLICIES:
            serve.run(build_app_from_config(parse_config(app_config(checkpoint, policy, args))), name=policy,
                      route_prefix=f"/{policy}")
        for n in args.concurrency:
            scripts = [conversation_script(1000 * n + i, args.turns, args.system_words, tuple(args.turn_words))
                       for i in range(n * args.conversations_per_client)]
            for policy in POLICIES:  # the same conversations through both routers (each app its own caches)
                url = f"http://127.0.0.1:{http_port}/{policy}/v1/chat/completions"
                results[(policy, n)] = asyncio.run(drive(url, scripts, n, args.max_tokens, tuple(args.think_s)))
    finally:
        serve.shutdown()
        ray.shutdown()
    return report(results, args)


def report(results: dict, args) -> int:
    print(f"{'router':<17}{'clients':>8}{'requests':>9}{'tokens/s':>10}{'TTFT p50':>10}{'p99':>8}"
          f"{'hit rate':>10}{'failed':>8}")
    for (policy, n), r in sorted(results.items(), key=lambda item: (item[0][1], item[0][0])):
        print(f"{policy:<17}{n:>8}{r['requests']:>9}{r['tokens_per_s']:>10.1f}{r['ttft_p50_ms']:>10.1f}"
              f"{r['ttft_p99_ms']:>8.1f}{r['hit_rate']:>10.3f}{r['failures']:>8}")
    print("(ms; hit rate: cached prompt tokens / prompt tokens)")
    ratios = {n: {"hit_rate_ratio": results[("prefix_affinity", n)]["hit_rate"]
                  / max(1e-9, results[("power_of_two", n)]["hit_rate"]),
                  "ttft_p50_ratio": results[("prefix_affinity", n)]["ttft_p50_ms"]
                  / results[("power_of_two", n)]["ttft_p50_ms"]} for n in args.concurrency}
    for n, r in ratios.items():
        print(f"ours / default at {n} clients: hit rate x{r['hit_rate_ratio']:.2f}, TTFT p50 x{r['ttft_p50_ratio']:.2f}")
    if args.json:
        top = max(args.concurrency)
        print(json.dumps({"benchmark": "bench_fleet", "git": git_revision(), **ratios[top],
                          "by_concurrency": {str(n): r for n, r in ratios.items()},
                          "results": [{"router": p, "concurrency": n} | r for (p, n), r in results.items()]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
