"""MXFP4 expert weights used straight from their packed form, on CPU.

Dequantizing a packed expert for every use writes 2 bytes per weight and reads them back; at batch 1
that is nearly all of a packed model's decode time. The kernel in csrc/mxfp4_linear.c decodes each
4-bit code in registers as it multiplies (a 16-entry table lookup per 16 codes on AVX-512, an 8-entry
one per 8 codes on AVX2 + FMA, plain C elsewhere), so a token reads each packed weight once:
- `experts`: a whole layer's experts (gate_up, clamped SwiGLU, down) in one call, for the experts
  with few tokens; `linear`: one projection;
- `dequantize`: the codec's dequantization in one pass, for the experts with many tokens (then a
  oneDNN GEMM) and for loading.
The library is compiled with the system's C compiler on first use and cached under
$GPTOSS_CACHE_DIR/kernels; where no compiler works (or GPTOSS_MXFP4_KERNEL=0) `available()` is False
and callers use the torch codec instead.

The products agree with dequantize-then-GEMM to float32 rounding (products are exact, sums are
float32 in another order), not bit for bit; `dequantize` is bit for bit the codec's.
"""

from __future__ import annotations

import ctypes
import logging
import threading

import torch

from gptoss import env, mxfp4, native

logger = logging.getLogger(__name__)

SOURCE = native.CSRC / "mxfp4_linear.c"

_thread_buffers = threading.local()  # see dequantize(reuse=True)


def declare(lib: ctypes.CDLL) -> None:
    lib.mxfp4_linear.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 3 + [ctypes.c_int]
    lib.mxfp4_linear.restype = None
    lib.mxfp4_linear_simd.restype = ctypes.c_int
    lib.mxfp4_dequantize.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64, ctypes.c_int, ctypes.c_int]
    lib.mxfp4_dequantize.restype = None
    lib.mxfp4_experts.argtypes = [ctypes.c_void_p] * 10 + [ctypes.c_int64] * 3 + [ctypes.c_float] * 2 + \
        [ctypes.c_int64, ctypes.c_int]
    lib.mxfp4_experts.restype = None


def build(flags: tuple[str, ...]) -> ctypes.CDLL:
    """The kernel compiled with `flags` (cached), loaded and typed."""
    lib = native.build(SOURCE, flags)
    declare(lib)
    return lib


KERNEL = native.Kernel(SOURCE, declare, "packed experts are dequantized per use instead (slower)")


def library() -> ctypes.CDLL | None:
    """The compiled kernel, built on first call; None (after one warning) where it cannot be built."""
    return KERNEL.library()


def available() -> bool:
    return env.mxfp4_kernel_enabled() and library() is not None


def linear(x: torch.Tensor, blocks: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None,
           lib: ctypes.CDLL | None = None) -> torch.Tensor:
    """x [T, G*32] (CPU, any float dtype), blocks [R, G, 16] uint8, scales [R, G] uint8, bias [R] ->
    [T, R] in x's dtype, with `lib` (default: `library()`, which must be available)."""
    lib = lib or library()
    if lib is None:
        raise RuntimeError(f"the MXFP4 kernel is not available: {KERNEL.failure}")
    rows, groups = scales.shape
    if (blocks.dtype, scales.dtype) != (torch.uint8, torch.uint8) or blocks.shape != (rows, groups, 16):
        raise ValueError(f"MXFP4 blocks {tuple(blocks.shape)} {blocks.dtype} do not match scales "
                         f"{tuple(scales.shape)} {scales.dtype}")
    tokens = x.shape[0]
    if x.shape != (tokens, groups * mxfp4.BLOCK_SIZE):
        raise ValueError(f"x {tuple(x.shape)} does not match {groups * mxfp4.BLOCK_SIZE} input features")
    # Per block: its 16 even elements, then its 16 odd ones (the low and high nibbles of its 16 bytes).
    xd = x.float().reshape(tokens, groups, 16, 2).transpose(-1, -2).contiguous()
    blocks, scales = blocks.contiguous(), scales.contiguous()
    bias32 = None if bias is None else bias.float().contiguous()
    out = torch.empty(tokens, rows, dtype=torch.float32)
    lib.mxfp4_linear(blocks.data_ptr(), scales.data_ptr(), xd.data_ptr(),
                     None if bias32 is None else bias32.data_ptr(), out.data_ptr(),
                     tokens, rows, groups, torch.get_num_threads())
    return out.to(x.dtype)


def experts(x: torch.Tensor, counts: list[int], gate_up: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
            down: tuple[torch.Tensor, torch.Tensor, torch.Tensor], alpha: float, limit: float,
            max_tokens: int | None = None) -> torch.Tensor:
    """A layer's experts in one call: x [N, H] sorted by expert (counts[e] rows for expert e) through
    each expert's gate_up projection, clamped SwiGLU and down projection -> [N, H] float32. Experts
    with more than `max_tokens` rows are left out: their rows of the result are left uninitialized.

    gate_up and down are (blocks [E, out, in/32, 16] uint8, scales [E, out, in/32] uint8, bias [E, out]
    float32). One call per layer instead of a dozen torch ops per expert: at decode batch sizes those
    cost more than the multiplications. Needs `available()`."""
    gu_blocks, gu_scales, gu_bias = gate_up
    dn_blocks, dn_scales, dn_bias = down
    num_experts, hidden = len(counts), x.shape[1]
    inter = dn_scales.shape[2] * mxfp4.BLOCK_SIZE
    if gu_scales.shape != (num_experts, 2 * inter, hidden // mxfp4.BLOCK_SIZE) or sum(counts) != x.shape[0]:
        raise ValueError(f"experts: x {tuple(x.shape)} with counts summing to {sum(counts)} does not match "
                         f"gate_up scales {tuple(gu_scales.shape)} / down scales {tuple(dn_scales.shape)}")
    tensors = [t.contiguous() for t in (gu_blocks, gu_scales, gu_bias, dn_blocks, dn_scales, dn_bias)]
    if tensors[2].dtype != torch.float32 or tensors[5].dtype != torch.float32:
        raise ValueError("experts: biases must be float32")
    x = x.float().contiguous()
    counts_t = torch.tensor(counts, dtype=torch.int64)
    out = torch.empty(x.shape, dtype=torch.float32)
    max_tokens = x.shape[0] if max_tokens is None else max_tokens
    most = max((n for n in counts if n <= max_tokens), default=0)
    workspace = torch.empty(most * (hidden + 3 * inter), dtype=torch.float32)
    library().mxfp4_experts(*(t.data_ptr() for t in tensors), x.data_ptr(), counts_t.data_ptr(), out.data_ptr(),
                            workspace.data_ptr(), num_experts, hidden, inter, alpha, limit, max_tokens,
                            torch.get_num_threads())
    return out


def dequantize(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16,
               reuse: bool = False, lib: ctypes.CDLL | None = None) -> torch.Tensor:
    """mxfp4.dequantize, in one pass of the compiled kernel (`lib`, default `library()`) where it is
    available (CPU, float32 or bfloat16); the same values bit for bit either way.

    reuse=True writes into this thread's buffer for that shape and dtype, overwritten by the next such
    call: a weight dequantized for one use. A fresh allocation of tens of MB costs more in page faults
    than the decoding itself."""
    if not (blocks.device.type == "cpu" and dtype in (torch.float32, torch.bfloat16) and (lib or available())):
        return mxfp4.dequantize(blocks, scales, dtype)
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8 or blocks.shape[:-1] != scales.shape \
            or blocks.shape[-1] != mxfp4.BYTES_PER_BLOCK:
        return mxfp4.dequantize(blocks, scales, dtype)  # raises, naming what is wrong
    blocks, scales = blocks.contiguous(), scales.contiguous()
    shape = (*scales.shape, mxfp4.BLOCK_SIZE)
    if reuse:
        buffers = _thread_buffers.__dict__.setdefault("by_shape", {})
        out = buffers.get((shape, dtype))
        if out is None:
            out = buffers[(shape, dtype)] = torch.empty(shape, dtype=dtype)
    else:
        out = torch.empty(shape, dtype=dtype)
    (lib or library()).mxfp4_dequantize(blocks.data_ptr(), scales.data_ptr(), out.data_ptr(), scales.numel(),
                                        int(dtype == torch.bfloat16), torch.get_num_threads())
    return out.flatten(-2)
