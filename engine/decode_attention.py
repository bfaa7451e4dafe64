"""Decode attention on CPU straight from the paged cache (csrc/decode_attention.c).

The torch path gathers every decode's blocks into a padded [Hkv, B, S, D] copy per layer and runs
batched matmuls over the padding; with 32 requests of a few hundred tokens that copy and its padding
cost more than the attention itself. The kernel reads each request's visible keys and values from
their blocks once, in place. Built on first use like the gptoss kernels (gptoss/native.py); where it
cannot be built (or $GPTOSS_DECODE_ATTENTION_KERNEL=0) `available()` is False and the torch path runs.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import torch

from gptoss import native

SOURCE = Path(__file__).with_name("csrc") / "decode_attention.c"


def declare(lib: ctypes.CDLL) -> None:
    lib.decode_attention.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int] + [ctypes.c_void_p] * 3 + \
        [ctypes.c_int64, ctypes.c_void_p, ctypes.c_float] + [ctypes.c_int64] * 7 + [ctypes.c_void_p, ctypes.c_int]
    lib.decode_attention.restype = ctypes.c_int


KERNEL = native.Kernel(SOURCE, declare, "decodes attend through torch's gathers instead")


def library() -> ctypes.CDLL | None:
    """The compiled kernel, built on first call; None (after one warning) where it cannot be built."""
    return KERNEL.library()


def enabled() -> bool:
    """$GPTOSS_DECODE_ATTENTION_KERNEL: "0" turns the kernel off (decodes take the torch path)."""
    return os.environ.get("GPTOSS_DECODE_ATTENTION_KERNEL", "1") != "0"


def available() -> bool:
    return enabled() and library() is not None


def applies(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    return (q.device.type == "cpu" and k_cache.dtype in (torch.float32, torch.bfloat16) and k_cache.is_contiguous()
            and available())


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, sinks: torch.Tensor,
                     scale: float, table: torch.Tensor, query_pos: torch.Tensor, key_start: torch.Tensor,
                     window: int | None, lib: ctypes.CDLL | None = None) -> torch.Tensor:
    """q [B, Hq, D]; k_cache, v_cache [Hkv, num_blocks, block_size, D] (contiguous, float32 or
    bfloat16); table [B, nbt] long: each request's blocks, the first holding key position
    key_start[b]; query_pos [B] -> [B, Hq, D] float32."""
    lib = lib or library()
    if lib is None:
        raise RuntimeError(f"the decode attention kernel is not available: {KERNEL.failure}")
    b, hq, d = q.shape
    hkv, num_blocks, block_size, _ = k_cache.shape
    if v_cache.shape != k_cache.shape or v_cache.dtype != k_cache.dtype or table.shape[0] != b or hq % hkv:
        raise ValueError(f"decode attention: q {tuple(q.shape)}, caches {tuple(k_cache.shape)} / "
                         f"{tuple(v_cache.shape)}, table {tuple(table.shape)} do not match")
    q32 = q.float().contiguous()
    sinks32 = sinks.float().contiguous()
    table, query_pos, key_start = (t.long().contiguous() for t in (table, query_pos, key_start))
    out = torch.empty(b, hq, d, dtype=torch.float32)
    if lib.decode_attention(q32.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), int(k_cache.dtype == torch.bfloat16),
                            table.data_ptr(), query_pos.data_ptr(), key_start.data_ptr(), window or 0,
                            sinks32.data_ptr(), scale, b, hq, hkv, d, num_blocks, block_size, table.shape[1],
                            out.data_ptr(), torch.get_num_threads()) != 0:
        raise MemoryError("decode attention: out of memory for its score buffers")
    return out
