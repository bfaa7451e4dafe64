"""What an EP group's caller side costs (the model server's share of the serving path), on a one-rank group
of a cheap engine (the `tiny` preset by default), driven from this process:

- waves: `--waves` waves of 64 one-token requests sent at once; CPU per request of this process ("caller")
  and of the rank. It uses nothing but `EPGroup.generate`, so it runs on any revision: run it on two to
  compare them (how handing a rank its requests in batches, `add_requests`, was measured).
- forward: 64 streams of `--max-tokens` tokens read by iterating `EPGroup.generate` (the baseline) and
  handed over through its `forward=` callback, alternating `--pairs` times; the CPU per token of this
  process's event-loop thread (where the model server does this work).

    .venv/bin/python benchmarks/bench_group_calls.py [--waves 20] [--pairs 3] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
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

import ray  # noqa: E402
import torch  # noqa: E402
from bench_common import checkpoint_or_default, git_revision  # noqa: E402
from bench_engine import make_prompts  # noqa: E402
from bench_serve import cpu_seconds_by_kind  # noqa: E402

from cluster import EPGroup, GroupConfig  # noqa: E402
from engine.config import EngineConfig  # noqa: E402
from engine.sampling_params import SamplingParams  # noqa: E402

WAVE = 64


async def waves(group: EPGroup, prompts, num_waves: int) -> dict:
    one_token = SamplingParams(max_tokens=1, temperature=0.0)

    async def one(request_id: str, prompt) -> None:
        async for _ in group.generate(request_id, prompt, one_token):
            pass

    async def wave(w: int) -> None:
        await asyncio.gather(*(one(f"w{w}-{i}", p) for i, p in enumerate(prompts)))

    for w in range(3):  # warm-up
        await wave(-1 - w)
    caller, rank = time.process_time(), cpu_seconds_by_kind().get("rank", 0.0)
    start = time.perf_counter()
    for w in range(num_waves):
        await wave(w)
    n = num_waves * len(prompts)
    return {"caller_ms_per_request": (time.process_time() - caller) / n * 1000,
            "rank_ms_per_request": (cpu_seconds_by_kind().get("rank", 0.0) - rank) / n * 1000,
            "wall_ms_per_request": (time.perf_counter() - start) / n * 1000}


async def read_streams(group: EPGroup, prompts, sampling, tag: str, forwarded: bool) -> float:
    """This thread's CPU microseconds per token for one round of streams."""

    async def one(i: int, prompt) -> int:
        count = 0

        def take(output) -> None:
            nonlocal count
            count += len(output.new_token_ids)

        extra = {"forward": take} if forwarded else {}
        async for output in group.generate(f"{tag}-{i}", prompt, sampling, **extra):
            take(output)
        return count

    start = time.thread_time()
    tokens = sum(await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts))))
    return (time.thread_time() - start) / tokens * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="default: a random checkpoint of --preset written once to the cache")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--waves", type=int, default=20)
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--json", action="store_true", help="last line: one JSON object with the figures")
    args = parser.parse_args()

    checkpoint = checkpoint_or_default(args.checkpoint, args.preset)
    cores = os.cpu_count() or 1
    has_forward = "forward" in inspect.signature(EPGroup.generate).parameters
    print(f"# bench_group_calls  rev {git_revision()}  {platform.machine()} {cores} cores  torch {torch.__version__}"
          f"  ray {ray.__version__}")
    print(f"# checkpoint {checkpoint} (float32), one rank, {WAVE} requests at once")
    prompts = make_prompts(WAVE, 20, 119, seed=0)
    sampling = SamplingParams(max_tokens=args.max_tokens, temperature=0.0)
    figures: dict = {"benchmark": "bench_group_calls", "git": git_revision()}
    ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False)
    try:
        async def run() -> None:
            group = EPGroup(GroupConfig(checkpoint=checkpoint, num_ranks=1, dtype="float32", device="cpu",
                                        engine=EngineConfig(max_num_seqs=WAVE), name="bench-calls"))
            await group.start()
            try:
                figures["waves"] = w = await waves(group, prompts, args.waves)
                print(f"waves of {WAVE} one-token requests: caller {w['caller_ms_per_request']:.3f} ms, rank "
                      f"{w['rank_ms_per_request']:.3f} ms CPU per request; wall {w['wall_ms_per_request']:.3f} ms")
                if not has_forward:
                    print("forward: this revision's EPGroup.generate has no forward=; skipped")
                    return
                await read_streams(group, prompts, sampling, "warm", True)
                iterated, forwarded = [], []
                for p in range(args.pairs):
                    iterated.append(await read_streams(group, prompts, sampling, f"i{p}", False))
                    forwarded.append(await read_streams(group, prompts, sampling, f"f{p}", True))
                    print(f"{WAVE} streams of {args.max_tokens} tokens, event-loop CPU per token: iterated "
                          f"{iterated[-1]:.1f} us, forwarded {forwarded[-1]:.1f} us")
                figures["iterated_us_per_token"], figures["forwarded_us_per_token"] = iterated, forwarded
            finally:
                await group.shutdown()

        asyncio.run(run())
    finally:
        ray.shutdown()
    if args.json:
        print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
