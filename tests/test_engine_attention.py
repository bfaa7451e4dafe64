"""engine/attention.py: paged attention against the reference eager attention (gptoss.model)."""

from __future__ import annotations

import pytest
import torch

from engine import attention, decode_attention
from engine.attention import build_attention_metadata, paged_attention, write_kv
from gptoss import native
from gptoss.model import attention_mask, sink_attention
from tests.test_mxfp4_linear import cpu_has

BLOCK_SIZE = 4
NUM_BLOCKS = 64


def scatter_into_blocks(k: torch.Tensor, v: torch.Tensor, block_ids: list[int], k_cache, v_cache) -> None:
    """Writes a sequence's k, v [S, Hkv, D] into its (scattered) blocks."""
    positions = torch.arange(k.shape[0])
    slots = torch.tensor(block_ids)[positions // BLOCK_SIZE] * BLOCK_SIZE + positions % BLOCK_SIZE
    write_kv(k_cache, v_cache, k, v, slots)


# (cached tokens, new tokens) per request: decodes (1 new token) first, then prefill chunks.
BATCHES = {
    "decodes-only": [(0, 1), (5, 1), (17, 1), (30, 1)],
    "prefills-only": [(0, 9), (12, 5)],
    "mixed": [(3, 1), (26, 1), (0, 13), (8, 7), (21, 3)],
    "one-prefill-no-padding": [(4, 1), (0, 22)],
    "long-and-short-prefills": [(7, 1), (0, 3), (40, 30), (0, 2), (2, 5), (0, 41), (60, 4)],
}


@pytest.fixture(params=["decode-kernel", "torch"])
def decode_path(request, monkeypatch):
    """Decodes through the CPU kernel (where it builds), or through torch's gathers."""
    kernel = request.param == "decode-kernel"
    if kernel and decode_attention.library() is None:
        pytest.skip("no C compiler: no decode attention kernel")
    monkeypatch.setenv("GPTOSS_DECODE_ATTENTION_KERNEL", "1" if kernel else "0")
    return request.param


@pytest.mark.parametrize("window", [None, 8, 5], ids=["full", "window-8", "window-5"])
@pytest.mark.parametrize("hq, hkv", [(4, 2), (8, 2), (2, 2)], ids=["gqa-2", "gqa-4", "mha"])
@pytest.mark.parametrize("batch", list(BATCHES.values()), ids=list(BATCHES))
def test_paged_attention_equals_the_reference_per_request(batch, hq, hkv, window, decode_path):
    gen = torch.Generator().manual_seed(0)
    d = 16
    k_cache = torch.randn(hkv, NUM_BLOCKS, BLOCK_SIZE, d, generator=gen)  # garbage where nothing was written
    v_cache = torch.randn(hkv, NUM_BLOCKS, BLOCK_SIZE, d, generator=gen)
    sinks = torch.randn(hq, generator=gen)
    free_blocks = torch.randperm(NUM_BLOCKS - 1, generator=gen).add(1).tolist()  # block 0 is the null block
    starts, lens, offsets, tables, qs, expected = [], [], [], [], [], []
    for cached, new in batch:
        total = cached + new
        blocks = [free_blocks.pop() for _ in range(-(-total // BLOCK_SIZE))]
        k, v = torch.randn(total, hkv, d, generator=gen), torch.randn(total, hkv, d, generator=gen)
        q = torch.randn(new, hq, d, generator=gen)
        scatter_into_blocks(k, v, blocks, k_cache, v_cache)
        positions = torch.arange(total)
        mask = attention_mask(positions[cached:], positions, window)
        expected.append(sink_attention(q, k, v, sinks, mask, 0.25))
        # Blocks the window no longer sees are the null block in the engine's tables: leave them out.
        first = 0 if window is None else max(0, cached - window + 1) // BLOCK_SIZE
        starts.append(cached), lens.append(new), offsets.append(first), tables.append(blocks[first:]), qs.append(q)
    num_decodes = sum(1 for n in lens if n == 1)
    positions = torch.cat([torch.arange(s, s + n) for s, n in zip(starts, lens, strict=True)])
    meta = build_attention_metadata(starts, lens, num_decodes, offsets, tables, BLOCK_SIZE, window, positions,
                                    torch.device("cpu"))
    out = paged_attention(torch.cat(qs), k_cache, v_cache, sinks, 0.25, meta)
    torch.testing.assert_close(out, torch.cat(expected), rtol=1e-5, atol=1e-5)


def test_slot_mapping_points_each_new_token_at_its_block_and_offset():
    positions = torch.tensor([5, 9, 10, 11])
    meta = build_attention_metadata([5, 9], [1, 3], 1, [0, 2], [(7, 3), (4, 6)], BLOCK_SIZE, 8, positions,
                                    torch.device("cpu"))
    # request 0: position 5 -> its table [7, 3] from block 0: block 3, offset 1
    # request 1: positions 9..11 -> its table [4, 6] starts at block index 2: block 4, offsets 1..3
    assert meta.slot_mapping.tolist() == [3 * 4 + 1, 4 * 4 + 1, 4 * 4 + 2, 4 * 4 + 3]


def test_an_empty_step_has_empty_metadata_and_attention():
    meta = build_attention_metadata([], [], 0, [], [], BLOCK_SIZE, None, torch.zeros(0, dtype=torch.long),
                                    torch.device("cpu"))
    out = paged_attention(torch.zeros(0, 4, 16), torch.zeros(2, 4, BLOCK_SIZE, 16), torch.zeros(2, 4, BLOCK_SIZE, 16),
                          torch.zeros(4), 0.25, meta)
    assert out.shape == (0, 64)


def test_prefill_chunks_of_very_different_sizes_are_padded_in_separate_buckets():
    # One long chunk and several short ones: padding them all to the long one would multiply the work.
    lens = [1, 300, 2, 3, 2, 4]
    starts = [9, 0, 0, 5, 0, 0]
    tables = [tuple(range(1, -(-(s + n) // BLOCK_SIZE) + 1)) for s, n in zip(starts, lens, strict=True)]
    positions = torch.cat([torch.arange(s, s + n) for s, n in zip(starts, lens, strict=True)])
    meta = build_attention_metadata(starts, lens, 1, [0] * 6, tables, BLOCK_SIZE, None, positions, torch.device("cpu"))
    shapes = sorted(tuple(b.bias.shape) for b in meta.prefills)
    assert shapes == [(1, 300, 300), (4, 4, 8)]  # the long one alone, the short ones together


def test_a_long_prefill_chunk_in_a_sliding_window_layer_is_cut_into_window_sized_tiles():
    # 300 queries with a window of 8: 38 tiles of <= 8 queries, each reading <= 4 blocks of 4 keys.
    table = tuple(range(1, 76))
    meta = build_attention_metadata([0], [300], 0, [0], [table], BLOCK_SIZE, 8, torch.arange(300), torch.device("cpu"))
    [bucket] = meta.prefills
    assert tuple(bucket.bias.shape) == (38, 8, 16)
    assert sorted(bucket.out_rows.tolist()) == list(range(300))


# Each path a machine can run: plain C (no -march), AVX2 + FMA; float32 and bfloat16 caches; a head
# size that is not a multiple of the vector width.
@pytest.mark.parametrize("flags, simd", [((), False), (("-mavx2", "-mfma"), True)], ids=["plain-c", "avx2"])
@pytest.mark.parametrize("dtype, d", [(torch.float32, 16), (torch.bfloat16, 16), (torch.float32, 12)],
                         ids=["f32", "bf16", "f32-d12"])
def test_the_decode_kernel_equals_the_torch_path(tmp_path, monkeypatch, flags, simd, dtype, d):
    if simd and not (cpu_has("avx2") and cpu_has("fma")):
        pytest.skip("this CPU has no AVX2 + FMA")
    monkeypatch.setenv("GPTOSS_CACHE_DIR", str(tmp_path))
    try:
        lib = native.build(decode_attention.SOURCE, ("-O3", *flags, "-fPIC", "-shared", "-fopenmp"))
    except Exception as e:  # noqa: BLE001 - no compiler here
        pytest.skip(f"cannot build the kernel: {e}")
    decode_attention.declare(lib)
    gen = torch.Generator().manual_seed(3)
    hq, hkv = 8, 2
    k_cache = torch.randn(hkv, NUM_BLOCKS, BLOCK_SIZE, d, generator=gen).to(dtype)
    v_cache = torch.randn(hkv, NUM_BLOCKS, BLOCK_SIZE, d, generator=gen).to(dtype)
    sinks = torch.randn(hq, generator=gen)
    for window in (None, 6):
        cached = [0, 3, 9, 30, 17]
        free_blocks = torch.randperm(NUM_BLOCKS - 1, generator=gen).add(1).tolist()
        tables = [[free_blocks.pop() for _ in range(c // BLOCK_SIZE + 1)] for c in cached]
        offsets = [0] * len(cached)
        if window:  # a table that starts past block 0, as the engine's do once the window has moved on
            offsets[3] = 4
            tables[3] = tables[3][4:]
        positions = torch.tensor(cached)
        meta = build_attention_metadata(cached, [1] * len(cached), len(cached), offsets, tables, BLOCK_SIZE, window,
                                        positions, torch.device("cpu"))
        q = torch.randn(len(cached), hq, d, generator=gen).to(dtype)
        got = decode_attention.decode_attention(q, k_cache, v_cache, sinks, 0.3, meta.decode_table,
                                                meta.decode_positions, meta.decode_key_starts, window, lib=lib)
        want = attention._attend(q[:, None], k_cache, v_cache, meta.decode_block_ids, meta.decode_bias, sinks,
                                 0.3)[:, 0]
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
