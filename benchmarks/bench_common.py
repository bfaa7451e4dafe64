"""What every benchmark does the same way: the git revision, the default checkpoint, a quiet local Ray."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def git_revision() -> str:
    """Short HEAD revision, "+dirty" when tracked files have uncommitted changes."""
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
        return rev + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def checkpoint_or_default(checkpoint: str | None, preset: str = "small") -> str:
    """`checkpoint`, or a random checkpoint of `preset` (default `small`, the CPU benchmark shape) written
    once to the cache."""
    if checkpoint is not None:
        return checkpoint
    from gptoss.writer import cached_random_checkpoint

    return str(cached_random_checkpoint(preset, seed=0))


def local_ray_env() -> None:
    """Environment defaults for a benchmark's own Ray instance; call before importing ray: no usage
    stats, no token auth, every node and gloo group on 127.0.0.1."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
