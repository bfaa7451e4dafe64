"""Expert load balancing (EPLB), two parts.

1. A running group: G=4 (`--ranks`) CPU rank actors on a local Ray, the `small` preset written with routers that
   favor four experts (all held by rank 0 by default), 32 concurrent prompts. Baseline: the same group
   without EPLB (contiguous placement). With EPLB at 0, 1 and 2 redundant experts per rank, the group
   serves a warm-up round (the counts' window), rearranges on an admin call while 32 streams run (its
   pause, failed requests), then serves a measured round. Figures per run: the busiest rank's expected
   load over the mean (from the measured round's routed-token counts under the placement then held),
   tokens per rank (all layers), group step time, tokens/s, and whether the greedy tokens equal the
   baseline's. On a 2-core machine the four ranks share two cores, so step times mostly measure
   contention; the imbalance is the figure that carries to a GPU node.
2. The planner alone by simulation: gpt-oss-120b's shape (128 experts, 36 MoE layers) at G = 8 and 16
   ranks, expert popularity Zipf(s) for s in 0.5, 1.0, 1.5 (the popular experts at random ids, another
   draw per layer), 0, 1 and 2 redundant experts per rank, against the default contiguous placement;
   and the planner's time for all 36 layers.

Loads are expected loads, an expert's tokens split evenly over its copies (what the dispatcher does).

    python benchmarks/bench_eplb.py [--json] [--skip-group] [--real-width-fetch]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_common import git_revision, local_ray_env  # noqa: E402
from parallel.eplb import imbalance, plan, rank_loads  # noqa: E402
from parallel.placement import ExpertPlacement  # noqa: E402

NUM_EXPERTS, NUM_LAYERS = 128, 36
GROUP_PROMPTS, GROUP_MAX_TOKENS = 32, 32
HOT_EXPERTS = {0: 2.5, 1: 2.0, 2: 1.5, 3: 1.0}  # router bias boosts: rank 0's four experts


def run_group(checkpoint: str, num_ranks: int, redundant: int | None, transfer: str = "checkpoint") -> dict:
    """One group (EPLB off when `redundant` is None): warm-up round, a rearrangement while a round runs,
    then the measured round."""
    import asyncio

    import torch

    from cluster import EPGroup, EplbConfig, GroupConfig
    from engine.config import EngineConfig
    from engine.sampling_params import SamplingParams

    eplb = EplbConfig(enabled=redundant is not None, redundant_experts_per_rank=redundant or 0, interval_steps=0,
                      window_steps=10_000, transfer=transfer)
    engine = EngineConfig(max_num_seqs=GROUP_PROMPTS, max_num_batched_tokens=2048, num_kv_blocks=512)
    group = EPGroup(GroupConfig(checkpoint=checkpoint, num_ranks=num_ranks, dtype="float32", engine=engine,
                                num_cpus_per_rank=max(0.5, (os.cpu_count() or 2) // num_ranks), eplb=eplb,
                                name=f"eplb-{redundant}"))
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 199998, (int(torch.randint(16, 64, (1,), generator=gen)),), generator=gen).tolist()
               for _ in range(GROUP_PROMPTS)]
    sampling = SamplingParams(max_tokens=GROUP_MAX_TOKENS, temperature=0.0)

    async def one(tag: str, i: int, started: asyncio.Event | None = None):
        tokens = []
        async for out in group.generate(f"{tag}{i}", prompts[i], sampling):
            tokens += out.new_token_ids
            if started is not None:
                started.set()
        return tokens

    async def round_(tag: str, rearrange: bool = False):
        started = asyncio.Event()
        tasks = [asyncio.create_task(one(tag, i, started)) for i in range(GROUP_PROMPTS)]
        pause = None
        if rearrange:
            await started.wait()
            pause = (await group.rebalance_experts()).pause_s
        results = await asyncio.gather(*tasks, return_exceptions=True)
        return results, pause

    async def scenario():
        await group.start()
        try:
            await round_("warm")
            failed, pause = 0, None
            if eplb.enabled:
                results, pause = await round_("moving", rearrange=True)
                failed = sum(isinstance(r, BaseException) for r in results)
            before = await group.stats()
            started = time.perf_counter()
            results, _ = await round_("measured")
            wall = time.perf_counter() - started
            after = await group.stats()
            return before, after, results, wall, failed, pause
        finally:
            await group.shutdown()

    before, after, results, wall, failed, pause = asyncio.run(scenario())
    failed += sum(isinstance(r, BaseException) for r in results)
    counts = [[a - b for a, b in zip(la, lb, strict=True)]
              for la, lb in zip(after.expert_token_counts, before.expert_token_counts, strict=True)]
    ranks = sorted(after.ranks, key=lambda r: r.rank)
    layer_imbalance, per_rank = [], [0.0] * num_ranks
    for layer, row in enumerate(counts):
        held = [r.layer_expert_ids[layer] if r.layer_expert_ids else r.expert_ids for r in ranks]
        loads = rank_loads(row, ExpertPlacement(len(row), tuple(held)))
        layer_imbalance.append(imbalance(loads))
        per_rank = [a + b for a, b in zip(per_rank, loads, strict=True)]
    steps = ranks[0].num_steps - sorted(before.ranks, key=lambda r: r.rank)[0].num_steps
    num_tokens = sum(len(r) for r in results if not isinstance(r, BaseException))
    return {"redundant_per_rank": redundant, "transfer": transfer if eplb.enabled else None, "imbalance_mean": sum(layer_imbalance) / len(layer_imbalance),
            "imbalance_worst": max(layer_imbalance), "tokens_per_rank": [round(x) for x in per_rank],
            "step_ms": 1000 * wall / max(1, steps), "tokens_per_s": num_tokens / wall, "failed_requests": failed,
            "pause_s": pause, "tokens": [r if not isinstance(r, BaseException) else None for r in results]}


def real_width_fetch(num_experts: int = 4) -> dict:
    """What a rank pays per expert it newly holds at gpt-oss's width (the `gpt-oss-20b-2l` preset: hidden
    2880, intermediate 2880, MXFP4): read from the memory-mapped checkpoint and written over a dropped
    expert's slot (a move's usual path), and, for comparison, built into a new set for the layer (the
    path where a rank's number of experts changes, which copies the kept experts too). Read and write
    are timed together: the mapped bytes move only when copied."""
    import torch

    import gptoss
    from gptoss.checkpoint import CheckpointReader, detect_layout
    from gptoss.load import read_experts
    from gptoss.writer import cached_random_checkpoint
    from parallel.moe import assemble_experts
    from parallel.rebalance import replace_in_place

    path = cached_random_checkpoint("gpt-oss-20b-2l")
    config = gptoss.load_config(path)
    reader = CheckpointReader(detect_layout(path))
    held = list(range(2 * num_experts))
    experts = gptoss.load_model(path, dtype=torch.bfloat16, experts=held, packed_experts=True).layers[0].mlp.experts
    figures = {}
    for label, new in (("first", list(range(16, 16 + num_experts))), ("again", list(range(16, 16 + num_experts)))):
        started = time.perf_counter()
        weights = read_experts(reader, 0, new, True, torch.bfloat16, "cpu")
        fetched = {e: {name: w[i] for name, w in weights.items()} for i, e in enumerate(new)}
        assemble_experts(experts, held[num_experts:] + new, config, fetched)
        figures[f"built_{label}_ms_per_new_expert"] = 1000 * (time.perf_counter() - started) / num_experts
    ids = list(experts.expert_ids)
    for label, new in (("first", list(range(24, 24 + num_experts))), ("again", list(range(16, 16 + num_experts)))):
        started = time.perf_counter()  # "again": experts read above, their pages in the page cache
        weights = read_experts(reader, 0, new, True, torch.bfloat16, "cpu")
        fetched = {e: {name: w[i] for name, w in weights.items()} for i, e in enumerate(new)}
        replace_in_place(experts, new + ids[num_experts:], config, fetched)
        figures[f"in_place_{label}_ms_per_new_expert"] = 1000 * (time.perf_counter() - started) / num_experts
    figures["mib_per_expert"] = sum(w[0].nbytes for w in weights.values()) / 2**20
    print(f"# real width (gpt-oss-20b-2l, MXFP4 experts of {figures['mib_per_expert']:.1f} MiB), ms per new expert "
          f"read and written over a dropped one: {figures['in_place_first_ms_per_new_expert']:.1f} (first read), "
          f"{figures['in_place_again_ms_per_new_expert']:.1f} (again); a layer of {2 * num_experts} built anew: "
          f"{figures['built_first_ms_per_new_expert']:.1f} / {figures['built_again_ms_per_new_expert']:.1f}")
    return figures


def group_part(num_ranks: int) -> dict:
    local_ray_env()
    import tempfile

    import ray

    import gptoss

    folder = tempfile.mkdtemp(prefix="bench-eplb-")
    checkpoint = str(gptoss.write_random_checkpoint(folder, "small", seed=0, router_bias_boost=HOT_EXPERTS))
    ray.init(num_cpus=max(4, os.cpu_count() or 2), include_dashboard=False, log_to_driver=False)
    print(f"# group: G={num_ranks} CPU ranks, small preset (16 experts, 4 layers) with routers favoring experts "
          f"{sorted(HOT_EXPERTS)}, {GROUP_PROMPTS} prompts x {GROUP_MAX_TOKENS} tokens, float32")
    print(f"{'EPLB':>10} {'imbalance mean':>14} {'worst':>6} {'tokens per rank (all layers)':>30} {'step ms':>8} "
          f"{'tok/s':>7} {'pause s':>8} {'failed':>6} {'same tokens':>11}")
    try:
        runs = [run_group(checkpoint, num_ranks, None)] + [run_group(checkpoint, num_ranks, r) for r in (0, 1, 2)]
        runs.append(run_group(checkpoint, num_ranks, 1, transfer="communicator"))
    finally:
        ray.shutdown()
    baseline = runs[0]
    for run in runs:
        run["identical_tokens"] = run["tokens"] == baseline["tokens"]
        label = "off" if run["redundant_per_rank"] is None else f"R={run['redundant_per_rank']}"
        label += " comm" if run["transfer"] == "communicator" else ""
        pause = f"{run['pause_s']:.3f}" if run["pause_s"] is not None else "-"
        print(f"{label:>10} {run['imbalance_mean']:>14.3f} {run['imbalance_worst']:>6.3f} "
              f"{str(run['tokens_per_rank']):>30} {run['step_ms']:>8.1f} {run['tokens_per_s']:>7.1f} {pause:>8} "
              f"{run['failed_requests']:>6} {str(run['identical_tokens']):>11}")
    for run in runs:
        del run["tokens"]
    on = next(r for r in runs if r["redundant_per_rank"] == 1 and r["transfer"] == "checkpoint")
    return {"runs": runs, "imbalance_off": baseline["imbalance_worst"], "imbalance_on": on["imbalance_worst"],
            "step_time_ratio": on["step_ms"] / baseline["step_ms"],
            "failed_requests": sum(r["failed_requests"] for r in runs),
            "identical_tokens": all(r["identical_tokens"] for r in runs),
            "pause_s": max(r["pause_s"] for r in runs if r["pause_s"] is not None)}


def zipf_counts(num_experts: int, s: float, rng: random.Random, tokens: float = 1e6) -> list[float]:
    """Tokens per expert with Zipf(s) popularity, the popular experts at random ids."""
    weights = [1 / (k + 1) ** s for k in range(num_experts)]
    order = list(range(num_experts))
    rng.shuffle(order)
    total = sum(weights)
    counts = [0.0] * num_experts
    for rank, expert in enumerate(order):
        counts[expert] = tokens * weights[rank] / total
    return counts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="last line: one JSON object with the figures")
    parser.add_argument("--skip-group", action="store_true", help="the planner simulation only")
    parser.add_argument("--ranks", type=int, default=4, help="G of the running group (2: a core per rank here)")
    parser.add_argument("--real-width-fetch", action="store_true",
                        help="also time reading experts at gpt-oss's width (writes a 3 GB checkpoint once)")
    args = parser.parse_args()
    group = None if args.skip_group else group_part(args.ranks)
    fetch = real_width_fetch() if args.real_width_fetch else None
    print(f"# bench_eplb @ {git_revision()}: planner simulation, {NUM_EXPERTS} experts x {NUM_LAYERS} layers")
    print(f"{'G':>3} {'zipf s':>6} {'R':>2} {'default mean':>12} {'default worst':>13} {'planned mean':>12} "
          f"{'planned worst':>13} {'plan ms':>8}")
    rows = []
    for world_size in (8, 16):
        for s in (0.5, 1.0, 1.5):
            rng = random.Random(f"{world_size}-{s}")
            counts = [zipf_counts(NUM_EXPERTS, s, rng) for _ in range(NUM_LAYERS)]
            for redundant in (0, 1, 2):
                started = time.perf_counter()
                layers = plan(counts, world_size, redundant)
                elapsed_ms = (time.perf_counter() - started) * 1000
                before = [layer.imbalance_before for layer in layers]
                after = [layer.imbalance_after for layer in layers]
                row = {"world_size": world_size, "zipf_s": s, "redundant_per_rank": redundant,
                       "imbalance_off": sum(before) / len(before), "imbalance_off_worst": max(before),
                       "imbalance_on": sum(after) / len(after), "imbalance_on_worst": max(after),
                       "plan_ms": elapsed_ms}
                rows.append(row)
                print(f"{world_size:>3} {s:>6} {redundant:>2} {row['imbalance_off']:>12.3f} "
                      f"{row['imbalance_off_worst']:>13.3f} {row['imbalance_on']:>12.3f} "
                      f"{row['imbalance_on_worst']:>13.3f} {elapsed_ms:>8.0f}")
    # The target: <= 1.10 with one redundant expert per rank wherever the default gives >= 1.5.
    skewed = [r for r in rows if r["redundant_per_rank"] == 1 and r["imbalance_off"] >= 1.5]
    met = all(r["imbalance_on_worst"] <= 1.10 for r in skewed)
    print(f"# one redundant expert per rank, where the default placement's imbalance is >= 1.5: worst planned "
          f"{max(r['imbalance_on_worst'] for r in skewed):.3f} (target <= 1.10: {'met' if met else 'NOT met'})")
    if args.json:
        figures = {"benchmark": "bench_eplb", "git": git_revision(), "simulation": rows,
                   "simulated_imbalance_off": max(r["imbalance_off"] for r in skewed),
                   "simulated_imbalance_on": max(r["imbalance_on_worst"] for r in skewed), "target_met": met}
        if group is not None:
            figures.update(group)
        if fetch is not None:
            figures["real_width_fetch"] = fetch
        print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
