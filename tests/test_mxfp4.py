import pytest
import torch

from gptoss import mxfp4

TABLE = [+0.0, +0.5, +1.0, +1.5, +2.0, +3.0, +4.0, +6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]


@pytest.mark.parametrize("scale", [0, 100, 120, 127, 130, 150, 200], ids=lambda s: f"E8M0={s}")
def test_decode_of_every_byte_matches_the_spec_table(scale):
    blocks = torch.arange(256, dtype=torch.uint8).view(16, 16)  # 16 blocks of 16 bytes
    scales = torch.full((16,), scale, dtype=torch.uint8)
    got = mxfp4.dequantize(blocks, scales, torch.float32).view(256, 2)
    for byte in range(256):
        low, high = TABLE[byte & 0x0F], TABLE[byte >> 4]  # low nibble is the earlier element
        want = torch.tensor([low, high], dtype=torch.float64) * 2.0 ** (scale - 127)
        assert torch.equal(got[byte].double(), want), byte


def test_dequantized_values_are_exact_in_bfloat16():
    blocks = torch.randint(0, 256, (4, 8, 16), dtype=torch.uint8)
    scales = torch.randint(110, 140, (4, 8), dtype=torch.uint8)
    assert torch.equal(mxfp4.dequantize(blocks, scales, torch.bfloat16).float(),
                       mxfp4.dequantize(blocks, scales, torch.float32))


@pytest.mark.parametrize("magnitude", [1e-3, 1.0, 37.0])
def test_quantize_then_dequantize_is_within_the_format_error_bound(magnitude):
    x = torch.randn(16, 8, 256, generator=torch.Generator().manual_seed(0)) * magnitude
    x[0, 0, :32] = 0  # an all-zero block
    blocks, scales = mxfp4.quantize(x)
    assert blocks.shape == (16, 8, 8, 16) and scales.shape == (16, 8, 8)
    y = mxfp4.dequantize(blocks, scales, torch.float32)
    # Per block scale 2^s with max|x| <= 6 * 2^s; the gap between neighbouring codes is 0.5 up to 2,
    # 1 up to 4 and 2 up to 6 (times 2^s), so the nearest code is within max(2^s / 4, |x| / 4).
    step = torch.ldexp(torch.ones(scales.shape), scales.int() - 127).repeat_interleave(32, dim=-1)
    bound = torch.maximum(step / 4, x.abs() / 4)
    assert ((x - y).abs() <= bound + 1e-12).all()
    assert (x.abs().view(16, 8, 8, 32).amax(-1) <= 6 * step[..., ::32] + 1e-12).all()
    assert torch.equal(y[0, 0, :32], torch.zeros(32))


def test_values_on_the_grid_round_trip_exactly():
    codes = torch.randint(0, 256, (3, 64, 16), dtype=torch.uint8)
    scales = torch.randint(120, 135, (3, 64), dtype=torch.uint8)
    x = mxfp4.dequantize(codes, scales, torch.float32)
    assert torch.equal(mxfp4.dequantize(*mxfp4.quantize(x), torch.float32), x)


def test_quantize_rejects_a_width_that_is_not_a_multiple_of_32():
    with pytest.raises(ValueError, match="multiple of 32"):
        mxfp4.quantize(torch.zeros(4, 40))


def test_packed_size_is_4_25_bits_per_weight():
    assert mxfp4.packed_nbytes(2880 * 5760) * 8 / (2880 * 5760) == 4.25
