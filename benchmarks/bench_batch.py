"""The cost of Ray Data and the EP group for batch jobs: `gptoss-serve batch`'s own path (`run_batch`:
a JSONL file of token-id rows -> render -> one Ray Data actor owning a G=1 group -> parse -> parts
written to a folder) next to the bare engine's `generate` on the same prompts, in this process, in the
same run.

    .venv/bin/python benchmarks/bench_batch.py [--num-prompts 512] [--max-tokens 64] [--json]

Both sides decode greedily with harmony's default stop tokens (what a batch row gets), so the same
tokens come out of both; the table says whether they are identical. The batch figure is end to end as a
user sees it: it includes starting the group (placing the rank, loading the checkpoint), which the
engine baseline (timed after a warm-up on a loaded model) does not pay; the group's start-up, measured
by a one-row job first, is printed apart. With `--json` the last line is one JSON object with
`batch_vs_engine` (end to end) and `batch_vs_engine_without_start`.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from bench_common import local_ray_env  # noqa: E402

local_ray_env()

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import ray  # noqa: E402
import torch  # noqa: E402
from bench_common import checkpoint_or_default, git_revision  # noqa: E402
from bench_group import make_prompts  # noqa: E402

import gptoss  # noqa: E402
from engine.engine import Engine  # noqa: E402
from engine.sampling_params import SamplingParams  # noqa: E402
from serve.batch import read_done_ids, run_batch  # noqa: E402
from serve.config import parse_config  # noqa: E402


def bench_engine(checkpoint: str, config, prompts, max_tokens: int) -> dict:
    engine = Engine(gptoss.load_model(checkpoint, dtype=torch.float32), config.engine_config())
    sampling = SamplingParams(max_tokens=max_tokens, temperature=0.0)  # default stop ids, as a batch row
    engine.generate(prompts[:64], sampling)  # warm-up: oneDNN primitives and the allocator
    start = time.perf_counter()
    completions = engine.generate(prompts, sampling)
    elapsed = time.perf_counter() - start
    tokens = [list(c.token_ids) for c in completions]
    return {"tokens_per_s": sum(map(len, tokens)) / elapsed, "elapsed_s": elapsed, "tokens": tokens}


def write_rows(path: Path, prompts, max_tokens: int) -> None:
    with path.open("w") as f:
        for i, prompt in enumerate(prompts):
            f.write(json.dumps({"id": f"p{i}", "prompt_token_ids": prompt, "max_tokens": max_tokens,
                                "temperature": 0.0}) + "\n")


def read_results(out: Path) -> dict[str, dict]:
    rows = {}
    for part in sorted(out.glob("part-*.jsonl")):
        with part.open() as f:  # lines end at "\n" only: text may hold other line separators
            for line in f:
                row = json.loads(line)
                rows[row["id"]] = row
    return rows


def bench_batch(config, prompts, max_tokens: int, work: Path, tag: str) -> dict:
    rows, out = work / f"{tag}.jsonl", work / f"{tag}-out"
    write_rows(rows, prompts, max_tokens)
    progress = io.StringIO()
    summary = run_batch(config, str(rows), str(out), progress=progress)
    results = read_results(out)
    assert len(read_done_ids(out)) == len(prompts) == len(results), progress.getvalue()
    errors = [r["error"] for r in results.values() if r["error"]]
    assert not errors, errors[:3]
    tokens = [list(results[f"p{i}"]["completion_token_ids"]) for i in range(len(prompts))]
    return {"tokens_per_s": summary.num_output_tokens / summary.elapsed_s, "elapsed_s": summary.elapsed_s,
            "tokens": tokens, "progress": progress.getvalue().strip().splitlines()[-1]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="default: a random `small` checkpoint written once to the cache")
    parser.add_argument("--num-prompts", type=int, default=512)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--json", action="store_true", help="last line: one JSON object with the figures")
    args = parser.parse_args()

    checkpoint = checkpoint_or_default(args.checkpoint)
    cores = os.cpu_count() or 1
    # The engine section both sides run with; no prefix caching, as the prompts share nothing.
    config = parse_config({
        "model": {"checkpoint": checkpoint, "dtype": "float32", "packed_experts": False},
        "group": {"num_ranks": 1, "device": "cpu", "num_cpus_per_rank": cores},
        "engine": {"max_num_seqs": 64, "max_num_batched_tokens": 2048, "kv_cache_gib": 1.0,
                   "enable_prefix_caching": False},
        "batch": {"num_groups": 1}}, "bench_batch")
    prompts = make_prompts(args.num_prompts, seed=1)
    print(f"# bench_batch  rev {git_revision()}  {platform.machine()} {cores} cores  torch {torch.__version__}  "
          f"ray {ray.__version__}")
    print(f"# checkpoint {checkpoint} (float32), {args.num_prompts} prompts of 16-255 tokens, greedy, up to "
          f"{args.max_tokens} new tokens (harmony's stop tokens), max_num_seqs {config.engine.max_num_seqs}; "
          f"batch: run_batch on 1 EP group of G=1 ({cores} CPUs), rows in flight "
          f"{config.batch.max_in_flight_per_group or 2 * config.engine.max_num_seqs}")

    engine = bench_engine(checkpoint, config, prompts, args.max_tokens)
    # Ray's CPUs: the rank's, plus room for the Data actor and the render/parse tasks (fractions).
    ray.init(num_cpus=cores + 2, include_dashboard=False, log_to_driver=False)
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False
        with tempfile.TemporaryDirectory(prefix="bench-batch-") as work:
            start_up = bench_batch(config, prompts[:1], 1, Path(work), "start")["elapsed_s"]
            batch = bench_batch(config, prompts, args.max_tokens, Path(work), "timed")
    finally:
        ray.shutdown()

    num_tokens = sum(map(len, batch["tokens"]))
    without_start = num_tokens / max(1e-9, batch["elapsed_s"] - start_up)
    identical = sum(a == b for a, b in zip(batch["tokens"], engine["tokens"], strict=True))
    print(f"{'':24}{'tokens':>8}{'seconds':>9}{'tokens/s':>10}{'vs engine':>11}")
    print(f"{'engine.generate':<24}{sum(map(len, engine['tokens'])):>8}{engine['elapsed_s']:>9.1f}"
          f"{engine['tokens_per_s']:>10.1f}{1.0:>10.2f}x")
    ratio = batch["tokens_per_s"] / engine["tokens_per_s"]
    print(f"{'batch (end to end)':<24}{num_tokens:>8}{batch['elapsed_s']:>9.1f}{batch['tokens_per_s']:>10.1f}"
          f"{ratio:>10.2f}x")
    ratio_without_start = without_start / engine["tokens_per_s"]
    print(f"{'batch less its start-up':<24}{num_tokens:>8}{batch['elapsed_s'] - start_up:>9.1f}"
          f"{without_start:>10.1f}{ratio_without_start:>10.2f}x")
    print(f"# group start-up (a one-row job): {start_up:.1f} s; identical greedy tokens: {identical} of "
          f"{len(prompts)} prompts; batch progress: {batch['progress']}")
    if args.json:
        print(json.dumps({
            "benchmark": "bench_batch", "git": git_revision(), "checkpoint": checkpoint,
            "num_prompts": len(prompts), "max_tokens": args.max_tokens,
            "engine_tokens_per_s": engine["tokens_per_s"], "batch_tokens_per_s": batch["tokens_per_s"],
            "batch_vs_engine": ratio, "batch_vs_engine_without_start": ratio_without_start,
            "start_up_s": start_up, "identical_prompts": identical,
        }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
