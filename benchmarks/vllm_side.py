"""The vLLM side of bench_engine.py, run by the python of a separate venv that has vLLM's CPU build (it
imports nothing of this project). bench_engine starts it once, and it answers one JSON line per request:

    {"cmd": "load", "model": DIR, "dtype": "float32"}         -> {"ok": true, "load_s": ...}
    {"cmd": "run", "prompts": [[ids], ...], "max_tokens": N}  -> {"elapsed_s": ..., "tokens": [[ids], ...]}

A run submits every prompt at once (vLLM schedules them as its engine does), greedy, exactly N tokens
each (ignore_eos), and is timed here, without the pipe. The model must be a non-quantized HF
checkpoint (bench_engine converts ours). Run with VLLM_ENABLE_V1_MULTIPROCESSING=0 so the engine runs
in this process, and OMP_NUM_THREADS set to the cores it may use.
"""

from __future__ import annotations

import json
import sys
import time


def main() -> int:
    # vLLM logs to stdout; the answers go through a duplicate of it, the logs to stderr.
    import os

    answers = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    llm = None
    for line in sys.stdin:
        request = json.loads(line)
        if request["cmd"] == "load":
            from vllm import LLM

            start = time.perf_counter()
            llm = LLM(model=request["model"], dtype=request["dtype"], skip_tokenizer_init=True, enforce_eager=True,
                      gpu_memory_utilization=0.5, enable_prefix_caching=False, max_num_seqs=256, seed=0)
            answers.write(json.dumps({"ok": True, "load_s": time.perf_counter() - start}) + "\n")
        elif request["cmd"] == "run":
            from vllm import SamplingParams
            from vllm.inputs import TokensPrompt

            n = request["max_tokens"]
            params = SamplingParams(max_tokens=n, min_tokens=n, temperature=0.0, ignore_eos=True, detokenize=False)
            prompts = [TokensPrompt(prompt_token_ids=p) for p in request["prompts"]]
            start = time.perf_counter()
            outputs = llm.generate(prompts, params, use_tqdm=False)
            elapsed = time.perf_counter() - start
            answers.write(json.dumps({"elapsed_s": elapsed,
                                      "tokens": [list(o.outputs[0].token_ids) for o in outputs]}) + "\n")
        else:
            answers.write(json.dumps({"error": f"unknown cmd {request['cmd']!r}"}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
