"""benchmarks/device_check.py, the script for the day a GPU is lent, run here on CPU on the tiny preset so
that it does not rot: every part runs (NCCL reports that it needs a GPU), and its JSON line has the
figures of each."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_device_check_runs_every_part_on_cpu_and_reports_them(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    run = subprocess.run([sys.executable, "benchmarks/device_check.py", "--device", "cpu", "--preset", "tiny",
                          "--engine-preset", "tiny", "--max-tokens", "4", "--folder", str(tmp_path)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    errors = {part: result[part]["error"] for part in ("parity", "engine", "nccl", "serve") if "error" in result[part]}
    assert not errors, (errors, run.stderr[-4000:])  # stderr: each failed part's traceback
    parity = result["parity"]
    assert parity["identical_greedy_tokens"] and parity["max_abs_logit_diff"] == 0.0  # CPU against itself
    assert all(result["engine"][f"tokens_per_s_at_{n}"] > 0 for n in (1, 8, 32))
    assert result["nccl"]["skipped"].startswith("no CUDA device")
    serve = result["serve"]
    # greedy, the same chat: the same tokens over both APIs
    assert serve["http_chat_tokens"] == serve["grpc_chat_tokens"] > 0 and serve["served_device"] == "cpu"
