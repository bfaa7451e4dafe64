"""Decode speed of a model with MXFP4-packed experts: the compiled MXFP4 kernel against dequantizing
each expert per use (the fallback without a C compiler), same checkpoint, same prompts, same run; each
side in its own process (GPTOSS_MXFP4_KERNEL=0 for the fallback), bfloat16 compute, greedy.

    .venv/bin/python benchmarks/bench_packed.py [--checkpoint DIR] [--batch 1 8] [--max-tokens 8] [--json]

Meant for a gpt-oss-20b-shaped checkpoint (`gptoss-serve checkpoint --preset gpt-oss-20b --out DIR`
writes a random one: ~13 GB, ~11 minutes on 2 cores); default: the cached `small` checkpoint. The
fallback needs seconds per step at 20b's size, so `--baseline-batch` (default: 1) limits the batch
sizes it runs. Per batch size: decode tokens/s (the batch over the median step time between a
request's tokens), time to first token, and how much of the greedy output the two sides share
(bf16: near-tied logits of random weights may split them).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_common import checkpoint_or_default, git_revision  # noqa: E402
from bench_engine import agreement, make_prompts, run_engine  # noqa: E402

SIDES = {"kernel": "1", "dequantize-per-use": "0"}  # side -> GPTOSS_MXFP4_KERNEL


def measure(checkpoint: str, batches: list[int], max_tokens: int) -> dict:
    """Runs in a child process: load packed, warm up, decode each batch size."""
    import gptoss
    from engine import Engine, EngineConfig
    from gptoss import mxfp4_linear

    start = time.perf_counter()
    model = gptoss.load_model(checkpoint, dtype=torch.bfloat16, packed_experts=True)
    load_s = time.perf_counter() - start
    engine = Engine(model, EngineConfig(max_num_seqs=max(batches), kv_cache_bytes=256 << 20,
                                        enable_prefix_caching=False))
    run_engine(engine, make_prompts(1, 4, 4, seed=99), 2)  # warm-up (builds the kernel), not timed
    out = {"kernel": mxfp4_linear.available(), "load_s": load_s, "batches": {}}
    for batch in batches:
        elapsed, tokens, figures = run_engine(engine, make_prompts(batch, 16, 32, seed=batch), max_tokens)
        out["batches"][str(batch)] = {"decode_tokens_per_s": batch / (figures["itl_p50_ms"] / 1e3),
                                      "decode_step_ms": figures["itl_p50_ms"], "ttft_ms": figures["ttft_p50_ms"],
                                      "end_to_end_tokens_per_s": batch * max_tokens / elapsed, "tokens": tokens}
    out["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="default: a random `small` checkpoint written once to the cache")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="concurrent prompts")
    parser.add_argument("--baseline-batch", type=int, nargs="*", default=[1],
                        help="batch sizes the dequantize-per-use side runs (it is slow at real size)")
    parser.add_argument("--max-tokens", type=int, default=8, help="generated tokens per prompt")
    parser.add_argument("--json", action="store_true", help="last line: one JSON object with the figures")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        print(json.dumps(measure(args.checkpoint, args.batch, args.max_tokens)))
        return 0

    import gptoss
    checkpoint = checkpoint_or_default(args.checkpoint)
    config = gptoss.load_config(checkpoint)
    print(f"# bench_packed  rev {git_revision()}  {platform.machine()} {os.cpu_count()} cores  "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads)")
    print(f"# checkpoint {checkpoint}: {config.num_hidden_layers} layers, hidden {config.hidden_size}, "
          f"{config.num_local_experts} experts top-{config.num_experts_per_tok} x {config.intermediate_size}; "
          f"bf16, packed experts, greedy, {args.max_tokens} tokens per prompt of 16..32")
    results = {}
    for side, switch in SIDES.items():
        batches = args.batch if side == "kernel" else [b for b in args.batch if b in args.baseline_batch]
        if not batches:
            continue
        cmd = [sys.executable, __file__, "--child", side, "--checkpoint", checkpoint, "--max-tokens",
               str(args.max_tokens), "--batch", *map(str, batches)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "GPTOSS_MXFP4_KERNEL": switch})
        if proc.returncode != 0:
            print(f"{side} failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
            return 1
        results[side] = json.loads(proc.stdout.strip().splitlines()[-1])
        if side == "kernel" and not results[side]["kernel"]:
            print("the MXFP4 kernel could not be built here (see the warning above): nothing to compare",
                  file=sys.stderr)
            return 1

    kernel, base = results["kernel"], results.get("dequantize-per-use")
    print(f"{'batch':>5} {'side':<20} {'decode tok/s':>12} {'step ms':>9} {'TTFT ms':>9} {'vs dequantize':>14} "
          f"{'agreement':>10}")
    summary = {}
    for b in args.batch:
        k = kernel["batches"][str(b)]
        d = base["batches"].get(str(b)) if base else None
        rows = [("kernel", k)] + ([("dequantize-per-use", d)] if d else [])
        for name, r in rows:
            ratio = f"{r['decode_tokens_per_s'] / d['decode_tokens_per_s']:.1f}x" if d else "-"
            agree = f"{agreement(k['tokens'], d['tokens']):.0%}" if d else "-"
            print(f"{b:>5} {name:<20} {r['decode_tokens_per_s']:>12.2f} {r['decode_step_ms']:>9.0f} "
                  f"{r['ttft_ms']:>9.0f} {ratio:>14} {agree:>10}")
        summary[f"decode_tokens_per_s_at_{b}"] = k["decode_tokens_per_s"]
        if d:
            summary[f"speedup_at_{b}"] = k["decode_tokens_per_s"] / d["decode_tokens_per_s"]
            summary[f"agreement_at_{b}"] = agreement(k["tokens"], d["tokens"])
    for side, r in results.items():
        print(f"# {side}: loaded in {r['load_s']:.0f} s, peak RSS {r['peak_rss_bytes'] / 2**30:.1f} GiB")
    if args.json:
        for r in results.values():
            for batch in r["batches"].values():
                batch.pop("tokens")
        print(json.dumps({"benchmark": "bench_packed", "git": git_revision(), "checkpoint": checkpoint,
                          "max_tokens": args.max_tokens, **summary, "sides": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
