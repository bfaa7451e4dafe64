"""MXFP4 codec (OCP microscaling FP4, as in the gpt-oss checkpoints).

Blocks of 32 values along the last (input) dimension: 16 bytes of 4-bit E2M1 codes, LOW nibble =
element 2j, HIGH nibble = element 2j+1, plus one E8M0 scale byte per block (multiplier 2^(s - 127)).
"""

from __future__ import annotations

import torch

BLOCK_SIZE = 32
BYTES_PER_BLOCK = 16
SCALE_BIAS = 127

FP4_VALUES = (+0.0, +0.5, +1.0, +1.5, +2.0, +3.0, +4.0, +6.0,
              -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
# Midpoints between consecutive magnitudes: bucketize(|x|) gives the nearest magnitude's code.
_MAGNITUDE_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)

_pair_lut_cache: dict[torch.device, torch.Tensor] = {}


def _pair_lut(device: torch.device) -> torch.Tensor:
    """[256, 2] float32: byte -> (value of its low nibble, value of its high nibble). One gather per
    byte instead of two nibble lookups: several times faster when experts are dequantized per use."""
    if device not in _pair_lut_cache:
        pairs = [(FP4_VALUES[b & 0x0F], FP4_VALUES[b >> 4]) for b in range(256)]
        _pair_lut_cache[device] = torch.tensor(pairs, dtype=torch.float32, device=device)
    return _pair_lut_cache[device]


def dequantize(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """blocks [..., G, 16] uint8, scales [..., G] uint8 -> values [..., G * 32] in `dtype`.

    Every value is a code times a power of two, so the result is exact in bf16 (within its range).
    """
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise ValueError(f"MXFP4 blocks and scales must be uint8, got {blocks.dtype} and {scales.dtype}")
    if blocks.shape[-1] != BYTES_PER_BLOCK or blocks.shape[:-1] != scales.shape:
        raise ValueError(f"MXFP4 blocks {tuple(blocks.shape)} do not match scales {tuple(scales.shape)}")
    # [..., G, 32]: each byte gives its low nibble's value first, then its high nibble's.
    values = _pair_lut(blocks.device).index_select(0, blocks.flatten().int()).view(*blocks.shape[:-1], BLOCK_SIZE)
    multipliers = torch.ldexp(torch.ones(scales.shape, device=scales.device), scales.int() - SCALE_BIAS)
    return (values * multipliers.unsqueeze(-1)).flatten(-2).to(dtype)


def quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """values [..., N] (N a multiple of 32) -> (blocks [..., N/32, 16] uint8, scales [..., N/32] uint8).

    Each block gets the smallest power-of-two scale that maps its largest magnitude to <= 6, and each
    value the nearest code, so |x - dequantize(quantize(x))| <= max(2^s / 4, |x| / 4) per element.
    """
    if x.shape[-1] % BLOCK_SIZE:
        raise ValueError(f"MXFP4 needs the last dimension to be a multiple of 32, got {x.shape[-1]}")
    xf = x.detach().float().reshape(*x.shape[:-1], x.shape[-1] // BLOCK_SIZE, BLOCK_SIZE)
    amax = xf.abs().amax(dim=-1)
    # 2^s >= amax / 6; an all-zero block keeps scale 2^0.
    exps = torch.where(amax > 0, torch.ceil(torch.log2(amax.clamp_min(1e-38) / 6.0)), torch.zeros_like(amax))
    exps = exps.clamp(-SCALE_BIAS, 254 - SCALE_BIAS)
    scaled = xf / torch.ldexp(torch.ones_like(exps), exps.to(torch.int32)).unsqueeze(-1)
    midpoints = torch.tensor(_MAGNITUDE_MIDPOINTS, device=x.device)
    codes = torch.bucketize(scaled.abs(), midpoints, right=False).to(torch.uint8)
    codes |= (scaled < 0).to(torch.uint8) << 3
    blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)
    scales = (exps + SCALE_BIAS).to(torch.uint8)
    return blocks.contiguous(), scales.contiguous()


def packed_nbytes(num_values: int) -> int:
    """Bytes MXFP4 holds for `num_values` weights: 16 + 1 per 32, i.e. 4.25 bits per weight."""
    return num_values // BLOCK_SIZE * (BYTES_PER_BLOCK + 1)
