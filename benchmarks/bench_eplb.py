"""The EPLB planner (parallel/eplb.py) by simulation: gpt-oss-120b's shape (128 experts, 36 MoE layers)
at G = 8 and 16 ranks, expert popularity Zipf(s) for s in 0.5, 1.0, 1.5 (the popular experts at random
ids, another draw per layer), 0, 1 and 2 redundant experts per rank. Baseline: the default contiguous
placement of the same counts. Figures: the busiest rank over the mean (mean and worst over the layers),
and the planner's time for all 36 layers.

Loads are expected loads, an expert's tokens split evenly over its copies: what a dispatcher that
spreads each expert's tokens over its copies gives. (Running a CPU group on a skewed checkpoint with
copies, and rearranging it online, is not built yet: this measures the planner alone.)

    python benchmarks/bench_eplb.py [--json]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_common import git_revision  # noqa: E402
from parallel.eplb import plan  # noqa: E402

NUM_EXPERTS, NUM_LAYERS = 128, 36


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
    args = parser.parse_args()
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
        print(json.dumps({"benchmark": "bench_eplb", "git": git_revision(), "rows": rows,
                          "imbalance_off": max(r["imbalance_off"] for r in skewed),
                          "imbalance_on": max(r["imbalance_on_worst"] for r in skewed), "target_met": met,
                          "step_time_ratio": None, "failed_requests": None, "identical_tokens": None,
                          "pause_s": None}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
