"""Prefill throughput, peak memory and expert-weight bytes of the reference model on the `small` preset,
for float32, bfloat16 and MXFP4-packed experts, next to Hugging Face transformers (float32, eager) on
the same checkpoint in the same run.

    .venv/bin/python benchmarks/bench_model.py [--lengths 128 512] [--repeats 3] [--json]

Each mode runs in its own process so its peak RSS is its own.
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

MODES = {
    # name: (engine, dtype, packed experts)
    "ours-float32": ("ours", "float32", False),
    "ours-bfloat16": ("ours", "bfloat16", False),
    "ours-mxfp4-packed-bf16": ("ours", "bfloat16", True),
    "transformers-float32": ("hf", "float32", False),
}


def measure(checkpoint: str, mode: str, lengths: list[int], repeats: int) -> dict:
    """Runs in a child process: load, warm up, time prefill at each length."""
    engine, dtype_name, packed = MODES[mode]
    dtype = getattr(torch, dtype_name)
    if engine == "ours":
        import gptoss

        model = gptoss.load_model(checkpoint, dtype=dtype, packed_experts=packed)
        expert_bytes = sum(b.nbytes for n, b in model.named_buffers() if ".experts." in n and "global_to_local" not in n
                           and "_bias" not in n)

        def forward(ids):
            return model(ids)
    else:
        import warnings

        import transformers

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = transformers.GptOssForCausalLM.from_pretrained(
                checkpoint, dtype=dtype, attn_implementation="eager",
                quantization_config=transformers.Mxfp4Config(dequantize=True)).eval()
        expert_bytes = sum(p.nbytes for n, p in model.named_parameters()
                           if ".experts." in n and not n.endswith("_bias"))

        def forward(ids):
            with torch.inference_mode():
                return model(ids[None], use_cache=False).logits[0]

    gen = torch.Generator().manual_seed(0)
    out = {"mode": mode, "expert_weight_bytes": expert_bytes, "prefill_tokens_per_s": {}}
    for length in lengths:
        ids = torch.randint(0, 199998, (length,), generator=gen)
        forward(ids)  # warm-up, not timed
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            forward(ids)
            times.append(time.perf_counter() - start)
        out["prefill_tokens_per_s"][str(length)] = length / min(times)
    out["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return out




def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="default: a random `small` checkpoint written once to the cache")
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--json", action="store_true", help="last line: one JSON object with the figures")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        print(json.dumps(measure(args.checkpoint, args.child, args.lengths, args.repeats)))
        return 0

    import gptoss
    checkpoint = checkpoint_or_default(args.checkpoint)
    config = gptoss.load_config(checkpoint)
    num_expert_weights = config.num_hidden_layers * config.num_local_experts * 3 * config.hidden_size * \
        config.intermediate_size
    print(f"# bench_model  rev {git_revision()}  {platform.machine()} {os.cpu_count()} cores  "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads)")
    print(f"# checkpoint {checkpoint}: {config.num_hidden_layers} layers, hidden {config.hidden_size}, "
          f"{config.num_local_experts} experts x {config.intermediate_size}, {num_expert_weights / 1e6:.1f} M expert weights")
    results = []
    for mode in args.modes:
        cmd = [sys.executable, __file__, "--child", mode, "--checkpoint", checkpoint, "--repeats",
               str(args.repeats), "--lengths", *map(str, args.lengths)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"{mode} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
            return 1
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))

    baseline = next((r for r in results if r["mode"] == "transformers-float32"), None)
    header = f"{'mode':<26}" + "".join(f"{'prefill ' + str(n) + ' tok/s':>20}" for n in args.lengths)
    header += f"{'vs transformers':>16}{'peak RSS MiB':>14}{'expert bytes':>14}{'bits/weight':>12}"
    print(header)
    for r in results:
        tps = [r["prefill_tokens_per_s"][str(n)] for n in args.lengths]
        ratio = (tps[-1] / baseline["prefill_tokens_per_s"][str(args.lengths[-1])]) if baseline else float("nan")
        r["bits_per_expert_weight"] = r["expert_weight_bytes"] * 8 / num_expert_weights
        r["vs_transformers_at_longest"] = ratio
        print(f"{r['mode']:<26}" + "".join(f"{t:>20.1f}" for t in tps) + f"{ratio:>15.2f}x"
              f"{r['peak_rss_bytes'] / 2**20:>14.0f}{r['expert_weight_bytes']:>14,}{r['bits_per_expert_weight']:>12.2f}")
    print("# spec: MXFP4 experts hold 4.25 bits/weight (16 bytes of codes + 1 scale byte per 32 weights)")
    if args.json:
        print(json.dumps({"benchmark": "bench_model", "git": git_revision(), "checkpoint": checkpoint,
                          "lengths": args.lengths, "spec_bits_per_weight_mxfp4": 4.25, "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
