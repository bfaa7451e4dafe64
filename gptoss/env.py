"""The environment variables the gptoss package reads, in one place."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """$GPTOSS_CACHE_DIR, default ~/.cache/gptoss-serve: the vocabulary copy and cached random checkpoints."""
    return Path(os.environ.get("GPTOSS_CACHE_DIR") or Path.home() / ".cache" / "gptoss-serve").expanduser()


def tiktoken_encodings_base() -> Path | None:
    """$TIKTOKEN_ENCODINGS_BASE: a folder holding o200k_base.tiktoken (read by openai-harmony too)."""
    value = os.environ.get("TIKTOKEN_ENCODINGS_BASE")
    return Path(value) if value else None


def mxfp4_kernel_enabled() -> bool:
    """$GPTOSS_MXFP4_KERNEL: "0" turns off the compiled MXFP4 linear kernel (packed experts are then
    dequantized per use, as on machines without a C compiler)."""
    return os.environ.get("GPTOSS_MXFP4_KERNEL", "1") != "0"


def greedy_screen_enabled() -> bool:
    """$GPTOSS_GREEDY_SCREEN: "0" turns off the screened argmax of greedy rows on CPU (they then take
    the full unembedding, like sampled rows)."""
    return os.environ.get("GPTOSS_GREEDY_SCREEN", "1") != "0"


def prebuilt_kernels_dir() -> Path | None:
    """$GPTOSS_KERNELS_DIR: prebuilt C kernels (`gptoss-serve kernels --prebuild DIR`), as an image
    ships them; unset: kernels are compiled here on first use."""
    value = os.environ.get("GPTOSS_KERNELS_DIR")
    return Path(value) if value else None
