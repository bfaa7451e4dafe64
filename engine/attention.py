"""Attention over the paged KV cache: sinks, sliding window, GQA; prefill chunks and decodes together.

`paged_attention` is the one call per layer; a GPU kernel (Triton, FlashInfer, ...) can replace it
behind the same signature. `AttentionMetadata` says where this step's queries and keys are; it is built
once per step and KV group and shared by the group's layers, so the per-layer work is tensor ops only.
`PagedAttentionContext` hands both to the model's own forward (it is a `gptoss.model.AttentionContext`).

Cache layout per layer: K and V each [Hkv, num_blocks, block_size, D]. Gathering a batch's blocks along
dim 1 yields [Hkv, B, S, D] directly, the layout batched matmuls want, with one contiguous copy per
block and head.

Decodes are one batched problem (each query against its own gathered keys); on CPU a kernel reads
them from the blocks in place instead (engine/decode_attention.py). Prefill chunks are padded
in buckets of similar sizes, so a long chunk is never padded together with many short ones; in a
sliding-window layer a long chunk is cut into window-sized tiles of queries that each read only their
window, which keeps those layers linear in the chunk length.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise

import torch

from engine import decode_attention
from gptoss.model import Attention

# Prefill chunks are padded to a common [queries x keys] shape in buckets of similar sizes; a bucket
# takes the next chunk while its padded area stays within this factor of the real one, or wastes
# fewer query-key pairs than a small fixed amount (not worth another batched call).
MAX_PADDING_FACTOR = 1.3
MAX_SMALL_PADDING = 64 * 1024


@dataclass(frozen=True)
class PrefillBucket:
    """Prefill chunks of similar size, padded to one [B, Tq] x [B, S] problem."""

    query_rows: torch.Tensor  # [B, Tq] long: the q row of each padded query slot (padding repeats a real one)
    out_rows: torch.Tensor | None  # [n] long: the q rows of the real slots, in padded order (None: all, in order)
    valid: torch.Tensor | None  # [B * Tq] bool: which padded slots are real (None: all)
    block_ids: torch.Tensor  # [B * nb] long: the blocks each chunk reads (null-padded)
    bias: torch.Tensor  # [B, Tq, nb * bs] float32: 0 where a key is visible, -inf elsewhere


@dataclass(frozen=True)
class AttentionMetadata:
    """One step, one KV group. Query rows [0, num_decodes) are single-token requests, one each; the
    rest are prefill chunks, request after request."""

    slot_mapping: torch.Tensor  # [T] long: cache slot (block * block_size + offset) of each new token
    num_decodes: int
    decode_block_ids: torch.Tensor | None  # [Bd * nb] long: blocks each decode reads (null-padded)
    decode_bias: torch.Tensor | None  # [Bd, 1, nb * bs] float32: 0 where a key is visible, -inf elsewhere
    prefills: tuple[PrefillBucket, ...]
    # For the CPU decode kernel (engine/decode_attention.py), which reads the blocks in place:
    decode_table: torch.Tensor | None = None  # [Bd, nb] long: each decode's blocks
    decode_positions: torch.Tensor | None = None  # [Bd] long: each decode's query position
    decode_key_starts: torch.Tensor | None = None  # [Bd] long: the key position its first block starts at
    window: int | None = None


@dataclass(frozen=True)
class PagedAttentionContext:
    """One step over the paged cache, as the model's forward sees it (a `gptoss.model.AttentionContext`):
    each layer writes its new K/V at the step's slots and attends with its group's metadata."""

    token_positions: torch.Tensor  # [T] long: the step's tokens' positions, request after request
    layer_kv: Sequence[tuple[torch.Tensor, torch.Tensor]]  # per layer: its K and V cache [Hkv, blocks, bs, D]
    layer_metadata: Sequence[AttentionMetadata]  # per layer: its KV group's (one object per group)

    def positions(self, num_tokens: int) -> torch.Tensor:
        assert num_tokens == self.token_positions.shape[0], (num_tokens, self.token_positions.shape)
        return self.token_positions

    def attend(self, attn: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        k_cache, v_cache = self.layer_kv[attn.layer]
        meta = self.layer_metadata[attn.layer]
        write_kv(k_cache, v_cache, k, v, meta.slot_mapping)
        return paged_attention(q, k_cache, v_cache, attn.sinks, attn.scale, meta)


def build_attention_metadata(start_positions: Sequence[int], num_tokens: Sequence[int], num_decodes: int,
                             block_offsets: Sequence[int], block_ids: Sequence[Sequence[int]], block_size: int,
                             window: int | None, positions: torch.Tensor, device: torch.device,
                             request_of_token: torch.Tensor | None = None) -> AttentionMetadata:
    """Index tensors of one step for one KV group.

    Args:
        start_positions, num_tokens: per request, the first position and count of its new tokens.
        num_decodes: the leading requests with exactly one new token.
        block_offsets, block_ids: per request, the table index of its first listed block, and the
            blocks from there on (the older ones are out of the window).
        positions: [T] the new tokens' positions, request after request (on the CPU).
        request_of_token: [T] the request index of each new token (derived when not given).
    """
    b = len(start_positions)
    if b == 0:
        return AttentionMetadata(torch.zeros(0, dtype=torch.long, device=device), 0, None, None, ())
    nb = max(len(ids) for ids in block_ids)
    table = torch.tensor([list(ids) + [0] * (nb - len(ids)) for ids in block_ids], dtype=torch.long)  # [B, nb]
    offsets = torch.tensor(block_offsets, dtype=torch.long)
    starts = torch.tensor(start_positions, dtype=torch.long)
    if request_of_token is None:
        lens = torch.tensor(num_tokens, dtype=torch.long)
        request_of_token = torch.repeat_interleave(torch.arange(b), lens, output_size=int(sum(num_tokens)))
    slots = table[request_of_token, positions // block_size - offsets[request_of_token]] * block_size
    slot_mapping = slots + positions % block_size

    decode_ids = decode_bias = decode_table = None
    if num_decodes:
        nbd = max(len(ids) for ids in block_ids[:num_decodes])
        key_pos = offsets[:num_decodes, None] * block_size + torch.arange(nbd * block_size)  # [Bd, S]
        decode_table = table[:num_decodes, :nbd].contiguous()
        decode_ids = decode_table.reshape(-1).to(device)
        decode_bias = _visibility_bias(starts[:num_decodes, None, None], key_pos[:, None, :], window).to(device)
    pieces = _prefill_pieces(range(num_decodes, b), start_positions, num_tokens, block_offsets, block_ids,
                             block_size, window)
    prefills = tuple(_prefill_bucket(bucket, block_size, window, device, whole=len(pieces) == len(bucket))
                     for bucket in _bucket_prefills(pieces, block_size))
    return AttentionMetadata(slot_mapping.to(device), num_decodes, decode_ids, decode_bias, prefills,
                             decode_table, starts[:num_decodes], offsets[:num_decodes] * block_size, window)


@dataclass(frozen=True)
class _Piece:
    """Queries of one prefill chunk (all of it, or a window-sized tile of it) and the blocks they read."""

    first_row: int  # q row of the first query
    start_position: int
    num_tokens: int
    block_offset: int  # table index of block_ids[0]
    block_ids: tuple[int, ...]


def _prefill_pieces(requests: range, start_positions: Sequence[int], num_tokens: Sequence[int],
                    block_offsets: Sequence[int], block_ids: Sequence[Sequence[int]], block_size: int,
                    window: int | None) -> list[_Piece]:
    """One piece per prefill chunk; with a sliding window, a chunk longer than the window is cut into
    window-sized tiles of queries, each reading only the blocks its window sees (linear, not
    quadratic, in the chunk length)."""
    pieces = []
    first_row = sum(num_tokens[:requests.start])
    for i in requests:
        start, n, offset, ids = start_positions[i], num_tokens[i], block_offsets[i], block_ids[i]
        tile = n if window is None else window
        for t in range(0, n, tile):
            m = min(tile, n - t)
            first = offset if window is None else max(offset, (start + t - window + 1) // block_size)
            last = (start + t + m - 1) // block_size
            pieces.append(_Piece(first_row + t, start + t, m, first, tuple(ids[first - offset:last - offset + 1])))
        first_row += n
    return pieces


def _bucket_prefills(pieces: list[_Piece], block_size: int) -> list[list[_Piece]]:
    """Groups pieces so that padding each group to its largest member wastes little."""
    buckets: list[list[_Piece]] = []
    real = max_tq = max_s = 0
    for piece in sorted(pieces, key=lambda p: (len(p.block_ids), p.num_tokens)):
        tq, s = piece.num_tokens, len(piece.block_ids) * block_size
        if buckets:
            padded = max(max_tq, tq) * max(max_s, s) * (len(buckets[-1]) + 1)
            if padded > MAX_PADDING_FACTOR * (real + tq * s) and padded - real - tq * s > MAX_SMALL_PADDING:
                buckets.append([])
                real = max_tq = max_s = 0
        else:
            buckets.append([])
        buckets[-1].append(piece)
        real, max_tq, max_s = real + tq * s, max(max_tq, tq), max(max_s, s)
    return buckets


def _prefill_bucket(pieces: list[_Piece], block_size: int, window: int | None, device: torch.device,
                    whole: bool) -> PrefillBucket:
    lens = torch.tensor([p.num_tokens for p in pieces], dtype=torch.long)
    tq = int(lens.max())
    nb = max(len(p.block_ids) for p in pieces)
    step = torch.arange(tq)
    valid = step[None, :] < lens[:, None]  # [B, Tq]
    first_row = torch.tensor([p.first_row for p in pieces], dtype=torch.long)
    rows = first_row[:, None] + torch.minimum(step[None, :], lens[:, None] - 1)
    key_pos = torch.tensor([p.block_offset for p in pieces])[:, None] * block_size + torch.arange(nb * block_size)
    query_pos = torch.tensor([p.start_position for p in pieces])[:, None] + step[None, :]  # [B, Tq]
    block_ids = torch.tensor([list(p.block_ids) + [0] * (nb - len(p.block_ids)) for p in pieces], dtype=torch.long)
    # Every piece of the step in one bucket, in row order, without padding: the output rows are contiguous.
    unpadded = whole and bool(valid.all()) and all(a.first_row < b.first_row for a, b in pairwise(pieces))
    return PrefillBucket(
        query_rows=rows.to(device),
        out_rows=None if unpadded else rows[valid].to(device),
        valid=None if unpadded else valid.reshape(-1).to(device),
        block_ids=block_ids.reshape(-1).to(device),
        bias=_visibility_bias(query_pos[:, :, None], key_pos[:, None, :], window).to(device))


def _visibility_bias(query_pos: torch.Tensor, key_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """0 where the key is visible to the query (causal, and within the window), -inf elsewhere."""
    diff = query_pos - key_pos
    visible = diff >= 0
    if window is not None:
        visible &= diff < window
    return torch.zeros(visible.shape, dtype=torch.float32).masked_fill_(~visible, float("-inf"))


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Stores the new tokens' k, v [T, Hkv, D] at their slots of k_cache, v_cache [Hkv, blocks, bs, D]."""
    hkv, num_blocks, bs, d = k_cache.shape
    k_cache.view(hkv, num_blocks * bs, d).index_copy_(1, slot_mapping, k.transpose(0, 1).to(k_cache.dtype))
    v_cache.view(hkv, num_blocks * bs, d).index_copy_(1, slot_mapping, v.transpose(0, 1).to(v_cache.dtype))


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, sinks: torch.Tensor,
                    scale: float, meta: AttentionMetadata) -> torch.Tensor:
    """Attention of this step's queries over the cache (their own K/V already written).

    q [T, Hq, D]; k_cache, v_cache [Hkv, num_blocks, block_size, D]; sinks [Hq] -> [T, Hq * D] in q's dtype.
    Math in float32, as the reference: softmax over the visible keys plus one sink logit per head.
    """
    t, hq, d = q.shape
    out = torch.empty(t, hq, d, dtype=torch.float32, device=q.device)
    nd = meta.num_decodes
    if nd and meta.decode_table is not None and decode_attention.applies(q, k_cache):
        out[:nd] = decode_attention.decode_attention(q[:nd], k_cache, v_cache, sinks, scale, meta.decode_table,
                                                     meta.decode_positions, meta.decode_key_starts, meta.window)
    elif nd:
        out[:nd] = _attend(q[:nd, None], k_cache, v_cache, meta.decode_block_ids, meta.decode_bias, sinks,
                           scale)[:, 0]
    for bucket in meta.prefills:
        bp, tq = bucket.query_rows.shape
        padded = _attend(q[bucket.query_rows], k_cache, v_cache, bucket.block_ids, bucket.bias, sinks,
                         scale).reshape(bp * tq, hq, d)
        if bucket.out_rows is None:
            out[nd:] = padded
        else:
            out[bucket.out_rows] = padded[bucket.valid]
    return out.view(t, hq * d).to(q.dtype)


def _attend(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_ids: torch.Tensor,
            bias: torch.Tensor, sinks: torch.Tensor, scale: float) -> torch.Tensor:
    """q [B, Tq, Hq, D]; block_ids [B * nb]; bias [B, Tq, S] -> [B, Tq, Hq, D] float32."""
    b, tq, hq, d = q.shape
    hkv = k_cache.shape[0]
    g = hq // hkv
    k = k_cache.index_select(1, block_ids).view(hkv * b, -1, d).float()  # [Hkv * B, S, D]
    v = v_cache.index_select(1, block_ids).view(hkv * b, -1, d).float()
    s = k.shape[1]
    # query head h uses KV head h // g: group the g query heads of a KV head as extra query rows
    qg = q.float().view(b, tq, hkv, g, d).permute(2, 0, 3, 1, 4).reshape(hkv * b, g * tq, d).mul_(scale)
    scores = torch.bmm(qg, k.transpose(1, 2)).view(hkv, b, g, tq, s)
    scores.add_(bias.view(1, b, 1, tq, s))
    # The sink is one more logit per head in the softmax's denominator only (no value): softmax over
    # [scores, sink] without materialising the extra column.
    sink = sinks.float().view(hkv, 1, g, 1, 1)
    peak = torch.maximum(scores.amax(dim=-1, keepdim=True), sink)
    probs = scores.sub_(peak).exp_()
    denom = probs.sum(dim=-1, keepdim=True).add_((sink - peak).exp_())
    out = torch.bmm(probs.view(hkv * b, g * tq, s), v).view(hkv, b, g, tq, d).div_(denom)
    return out.permute(1, 3, 0, 2, 4).reshape(b, tq, hq, d)
