"""Shared test set-up: an isolated environment and the expensive shared objects (checkpoints)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

# Nothing leaks into the home folder, and no test depends on the network or Ray's token auth.
_OWN_TMP = not os.environ.get("GPTOSS_TEST_TMP")
_TMP = Path(os.environ.get("GPTOSS_TEST_TMP") or tempfile.mkdtemp(prefix="gptoss-tests-"))
os.environ.setdefault("GPTOSS_CACHE_DIR", str(_TMP / "cache"))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_TMPDIR", str(_TMP / "ray"))
os.environ.setdefault("CUPY_CACHE_DIR", str(_TMP / "cupy"))

import shutil  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

import gptoss  # noqa: E402


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """The `tiny` preset in the HF release layout, seed 0."""
    return gptoss.write_random_checkpoint(tmp_path_factory.mktemp("tiny"), "tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_model(tiny_checkpoint):
    return gptoss.load_model(tiny_checkpoint, dtype=torch.float32)


def pytest_sessionfinish(session, exitstatus):
    if _OWN_TMP:
        shutil.rmtree(_TMP, ignore_errors=True)
