"""The compiled MXFP4 linear kernel against an exact (float64) product with the dequantized weights."""

import threading

import pytest
import torch

from gptoss import mxfp4, mxfp4_linear

pytestmark = pytest.mark.skipif(not mxfp4_linear.available(), reason="no C compiler to build the MXFP4 kernel")


def random_packed(rows: int, groups: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, 256, (rows, groups, 16), dtype=torch.uint8, generator=g)
    blocks[0, 0] = torch.arange(16, dtype=torch.uint8) * 17  # every code, in both nibbles
    scales = torch.randint(118, 132, (rows, groups), dtype=torch.uint8, generator=g)
    scales[2, 0] = 0  # the smallest multiplier, 2^-127
    return blocks, scales, torch.randn(rows, generator=g)


def exact(x: torch.Tensor, blocks: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    w = mxfp4.dequantize(blocks, scales, torch.float64)
    return torch.nn.functional.linear(x.double(), w, None if bias is None else bias.double())


def assert_within_float32_rounding(got, x, blocks, scales, bias) -> None:
    # Float32 sums of exact products: within a few float32 ulps of the sum of magnitudes.
    bound = 1e-5 * (x.double().abs() @ mxfp4.dequantize(blocks, scales, torch.float64).abs().T + 1)
    assert ((got.double() - exact(x, blocks, scales, bias)).abs() <= bound).all()


@pytest.mark.parametrize("tokens", [1, 2, 3, 4, 5, 8, 9, 64])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
def test_the_kernel_equals_the_dequantized_product_to_float32_rounding(tokens, with_bias):
    blocks, scales, bias = random_packed(rows=37, groups=6, seed=tokens)  # 37 rows: uneven thread shares
    x = torch.randn(tokens, 6 * 32, generator=torch.Generator().manual_seed(100 + tokens))
    got = mxfp4_linear.linear(x, blocks, scales, bias if with_bias else None)
    assert got.dtype == torch.float32 and got.shape == (tokens, 37)
    assert_within_float32_rounding(got, x, blocks, scales, bias if with_bias else None)


def test_every_code_and_the_extreme_scales_decode_as_the_codec_does():
    # One-hot inputs read single weights back: the kernel's decode equals mxfp4.dequantize exactly
    # (scales from 2^-127, a float32 subnormal, to 2^123; beyond it 6 * 2^s overflows float32).
    blocks = torch.arange(256, dtype=torch.uint8).view(1, 16, 16).repeat(4, 1, 1)
    scales = torch.tensor([0, 100, 127, 250], dtype=torch.uint8).view(4, 1).repeat(1, 16)
    x = torch.eye(16 * 32)
    got = mxfp4_linear.linear(x, blocks, scales)
    assert torch.equal(got.T, mxfp4.dequantize(blocks, scales, torch.float32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_the_compiled_dequantize_equals_the_codec_bit_for_bit(dtype):
    blocks = torch.arange(256, dtype=torch.uint8).view(1, 16, 16).repeat(6, 1, 1)  # every byte
    scales = torch.tensor([0, 1, 100, 127, 200, 254], dtype=torch.uint8).view(6, 1).repeat(1, 16)
    got = mxfp4_linear.dequantize(blocks, scales, dtype)
    assert got.dtype == dtype and got.shape == (6, 512)
    assert torch.equal(got, mxfp4.dequantize(blocks, scales, dtype))
    many = torch.randint(0, 256, (3, 5, 7, 16), dtype=torch.uint8)  # leading dimensions kept
    many_scales = torch.randint(110, 140, (3, 5, 7), dtype=torch.uint8)
    assert torch.equal(mxfp4_linear.dequantize(many, many_scales, dtype), mxfp4.dequantize(many, many_scales, dtype))


@pytest.mark.parametrize("counts", [[2, 0, 5], [1, 1, 1], [0, 0, 9], [130, 3, 0], [2, 7, 1]], ids=str)
def test_a_layer_of_experts_in_one_call_equals_each_expert_in_turn(counts):
    from gptoss.model import clamped_swiglu

    hidden, inter, alpha, limit = 64, 96, 1.702, 7.0
    g = torch.Generator().manual_seed(sum(counts))
    gate_up = mxfp4.quantize(torch.randn(3, 2 * inter, hidden, generator=g) * 0.2) + (torch.randn(3, 2 * inter, generator=g),)
    down = mxfp4.quantize(torch.randn(3, hidden, inter, generator=g) * 0.2) + (torch.randn(3, hidden, generator=g),)
    x = torch.randn(sum(counts), hidden, generator=g) * 3  # large enough for the clamp at +-7 to bite
    got = mxfp4_linear.experts(x, counts, gate_up, down, alpha, limit)
    want, start = [], 0
    for e, n in enumerate(counts):
        w1, w2 = (mxfp4.dequantize(p[0][e], p[1][e], torch.float64) for p in (gate_up, down))
        h = torch.nn.functional.linear(x[start:start + n].double(), w1, gate_up[2][e].double())
        want.append(torch.nn.functional.linear(clamped_swiglu(h, alpha, limit), w2, down[2][e].double()))
        start += n
    want = torch.cat(want)
    assert got.dtype == torch.float32 and got.shape == x.shape
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
    # With a limit, the experts over it are left alone and the others come out the same.
    limited = mxfp4_linear.experts(x, counts, gate_up, down, alpha, limit, max_tokens=2)
    start = 0
    for n in counts:
        if n <= 2:
            assert torch.equal(limited[start:start + n], got[start:start + n])
        start += n


def test_a_reused_buffer_is_one_per_thread_shape_and_dtype():
    blocks, scales, _ = random_packed(rows=4, groups=2, seed=6)
    first = mxfp4_linear.dequantize(blocks, scales, torch.float32, reuse=True)
    want = mxfp4.dequantize(blocks, scales, torch.float32)
    assert torch.equal(first, want)
    again = mxfp4_linear.dequantize(blocks.flip(0), scales.flip(0), torch.float32, reuse=True)
    assert again.data_ptr() == first.data_ptr() and torch.equal(again, want.flip(0))  # overwritten in place
    assert mxfp4_linear.dequantize(blocks, scales, torch.bfloat16, reuse=True).data_ptr() != first.data_ptr()
    assert mxfp4_linear.dequantize(blocks, scales, torch.float32).data_ptr() != first.data_ptr()
    other = []
    thread = threading.Thread(target=lambda: other.append(
        mxfp4_linear.dequantize(blocks, scales, torch.float32, reuse=True).data_ptr()))
    thread.start()
    thread.join()
    assert other[0] != first.data_ptr()


def test_bfloat16_inputs_give_bfloat16_outputs_rounded_from_float32_sums():
    blocks, scales, bias = random_packed(rows=16, groups=4, seed=1)
    x = torch.randn(3, 128).to(torch.bfloat16)
    got = mxfp4_linear.linear(x, blocks, scales, bias.to(torch.bfloat16))
    want = mxfp4_linear.linear(x.float(), blocks, scales, bias.to(torch.bfloat16).float())
    assert got.dtype == torch.bfloat16 and torch.equal(got, want.to(torch.bfloat16))


def test_the_result_does_not_depend_on_the_thread_count():
    blocks, scales, bias = random_packed(rows=101, groups=3, seed=2)
    x = torch.randn(5, 96)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = mxfp4_linear.linear(x, blocks, scales, bias)
        torch.set_num_threads(3)
        shared = mxfp4_linear.linear(x, blocks, scales, bias)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(alone, shared)


def cpu_has(flag: str) -> bool:
    try:
        return any(flag in line.split() for line in open("/proc/cpuinfo") if line.startswith("flags"))
    except OSError:
        return False


# Each path a machine can run, whatever -march=native picks here: plain C (no -march), AVX2 + FMA.
@pytest.mark.parametrize("flags, simd", [((), 0), (("-mavx2", "-mfma"), 256)], ids=["plain-c", "avx2"])
def test_each_c_path_is_exact_where_the_cpu_runs_it(tmp_path, monkeypatch, flags, simd):
    if simd == 256 and not (cpu_has("avx2") and cpu_has("fma")):
        pytest.skip("this CPU has no AVX2 + FMA")
    monkeypatch.setenv("GPTOSS_CACHE_DIR", str(tmp_path))
    lib = mxfp4_linear.build(("-O3", *flags, "-fPIC", "-shared"))
    assert lib.mxfp4_linear_simd() == simd
    blocks, scales, bias = random_packed(rows=22, groups=5, seed=3)  # 22 rows: a tail beside the tiles
    for tokens in (1, 2, 3, 4, 6):
        x = torch.randn(tokens, 160)
        got = mxfp4_linear.linear(x, blocks, scales, bias, lib=lib)
        assert_within_float32_rounding(got, x, blocks, scales, bias)
    every_byte = torch.arange(256, dtype=torch.uint8).view(1, 16, 16).repeat(3, 1, 1)
    extreme = torch.tensor([0, 127, 250], dtype=torch.uint8).view(3, 1).repeat(1, 16)
    for dtype in (torch.float32, torch.bfloat16):
        got = mxfp4_linear.dequantize(every_byte, extreme, dtype, lib=lib)
        assert torch.equal(got, mxfp4.dequantize(every_byte, extreme, dtype))


def test_shapes_that_do_not_match_are_refused_by_name():
    blocks, scales, _ = random_packed(rows=8, groups=2, seed=4)
    with pytest.raises(ValueError, match="input features"):
        mxfp4_linear.linear(torch.randn(2, 96), blocks, scales)
    with pytest.raises(ValueError, match="do not match scales"):
        mxfp4_linear.linear(torch.randn(2, 64), blocks[:, :1], scales)
    with pytest.raises(ValueError, match="do not match scales"):
        mxfp4_linear.dequantize(blocks[:, :1], scales)


def test_without_a_compiler_the_kernel_is_unavailable_with_one_warning(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("GPTOSS_CACHE_DIR", str(tmp_path))  # nothing built there yet
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setattr(mxfp4_linear.KERNEL, "_library", None)  # built again (and failing) below
    monkeypatch.setattr(mxfp4_linear.KERNEL, "failure", None)
    assert not mxfp4_linear.available() and not mxfp4_linear.available()
    warnings = [r for r in caplog.records if "could not build mxfp4_linear.c" in r.getMessage()]
    assert len(warnings) == 1 and "dequantized per use" in warnings[0].getMessage()


def test_the_switch_turns_the_kernel_off_and_dequantize_falls_back_to_the_codec(monkeypatch):
    monkeypatch.setenv("GPTOSS_MXFP4_KERNEL", "0")
    assert not mxfp4_linear.available()
    blocks, scales, _ = random_packed(rows=4, groups=2, seed=5)
    assert torch.equal(mxfp4_linear.dequantize(blocks, scales, torch.float32),
                       mxfp4.dequantize(blocks, scales, torch.float32))
    with pytest.raises(ValueError, match="do not match scales"):
        mxfp4_linear.dequantize(blocks[:, :1], scales)
