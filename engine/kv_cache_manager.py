"""`KVCacheManager`: which blocks each request holds, per KV group, and prefix-cache lookups.

gpt-oss alternates full-attention and sliding-window layers. Their K/V live in two KV groups that
draw blocks from one shared pool: a full-attention block table covers the whole context, a
sliding-window table keeps only the blocks its window can still see (earlier entries are the null
block and their blocks go back to the pool), so at long context the sliding layers cost a bounded
number of blocks per request and the KV bytes per token are those of the full layers only.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

from engine.block_pool import BlockPool, KVBlock, hash_block
from engine.request import Request
from gptoss.config import ModelConfig


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class KVCacheGroup:
    """Layers whose K/V share block tables: same attention kind, same window."""

    layer_ids: tuple[int, ...]
    window: int | None  # sliding window in tokens (a query sees itself and window - 1 keys before); None: full

    def first_needed_position(self, position: int) -> int:
        """The first key position a query at `position` (or any later one) can see."""
        return 0 if self.window is None else max(0, position - self.window + 1)


def kv_cache_groups(config: ModelConfig) -> tuple[KVCacheGroup, ...]:
    """Full-attention layers first, then one group per sliding-window size."""
    full = tuple(i for i in range(config.num_hidden_layers) if not config.is_sliding(i))
    sliding = tuple(i for i in range(config.num_hidden_layers) if config.is_sliding(i))
    groups = [KVCacheGroup(full, None)] if full else []
    if sliding:
        groups.append(KVCacheGroup(sliding, config.sliding_window))
    return tuple(groups)


class KVCacheManager:
    """Owns request -> blocks (one table per KV group); the pool owns the blocks themselves."""

    def __init__(self, groups: Sequence[KVCacheGroup], num_blocks: int, block_size: int,
                 enable_prefix_caching: bool, max_num_batched_tokens: int):
        self.groups = tuple(groups)
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.max_num_batched_tokens = max_num_batched_tokens
        self.pool = BlockPool(num_blocks, enable_prefix_caching)
        self._tables: dict[str, list[list[KVBlock]]] = {}  # request id -> per group, block per position // bs
        self._num_registered: dict[str, int] = {}  # request id -> leading full blocks already in the prefix map
        self._hash_seed = os.urandom(16)  # secret: with the cache salt, the parent of a request's first block
        self._salted_seeds: dict[str, bytes] = {"": self._hash_seed}

    # --- sizing --------------------------------------------------------------------------------

    def get_max_num_blocks(self, num_tokens: int) -> int:
        """The most blocks one request of `num_tokens` tokens ever holds at once, all groups together."""
        n = cdiv(num_tokens, self.block_size)
        total = 0
        for group in self.groups:
            if group.window is None:
                total += n
            else:  # the window before the first new token, plus the largest chunk, plus block misalignment
                total += min(n, cdiv(group.window - 1 + self.max_num_batched_tokens, self.block_size) + 1)
        return total

    def get_max_num_tokens(self, limit: int) -> int:
        """The longest request (<= limit) that fits the whole pool on its own."""
        lo, hi = 0, limit
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.get_max_num_blocks(mid) <= self.pool.num_usable_blocks:
                lo = mid
            else:
                hi = mid - 1
        return lo

    # --- prefix caching ------------------------------------------------------------------------

    def _extend_block_hashes(self, request: Request, num_tokens: int) -> None:
        hashes, bs, tokens = request.block_hashes, self.block_size, request.token_ids
        while len(hashes) < num_tokens // bs:
            i = len(hashes)
            parent = hashes[-1] if hashes else self._first_parent(request.cache_salt)
            hashes.append(hash_block(parent, tokens[i * bs:(i + 1) * bs]))

    def _first_parent(self, cache_salt: str) -> bytes:
        """The first block's parent hash under a salt: the same prompt under two salts (two API keys)
        shares no block, so a tenant cannot learn another's prompts from cache hits."""
        seed = self._salted_seeds.get(cache_salt)
        if seed is None:
            if len(self._salted_seeds) > 100_000:  # bounded: a seed is cheap to recompute
                self._salted_seeds = {"": self._hash_seed}
            seed = self._salted_seeds[cache_salt] = hash_block(self._hash_seed + cache_salt.encode(), ())
        return seed

    def get_computed_blocks(self, request: Request) -> tuple[list[list[KVBlock]], int]:
        """The longest cached prefix of a request about to be admitted: per group the blocks to reuse
        (null where a window needs none), and the number of tokens they cover. No side effects on
        the pool; `allocate_slots` takes the blocks."""
        empty: list[list[KVBlock]] = [[] for _ in self.groups]
        if not self.enable_prefix_caching:
            return empty, 0
        self._extend_block_hashes(request, request.num_tokens)
        # The last token is always computed: its logits give the next token.
        hashes = request.block_hashes[:(request.num_tokens - 1) // self.block_size]
        num_hit = len(hashes)
        changed = True
        while changed:  # each group can only shorten the hit; stop when every group agrees
            changed = False
            for gi, group in enumerate(self.groups):
                n = self._longest_hit(gi, group, hashes[:num_hit])
                if n < num_hit:
                    num_hit, changed = n, True
        if num_hit == 0:
            return empty, 0
        blocks = []
        for gi, group in enumerate(self.groups):
            first = group.first_needed_position(num_hit * self.block_size) // self.block_size
            blocks.append([self.pool.null_block] * first
                          + [self.pool.get_cached_block((gi, h)) for h in hashes[first:num_hit]])
        return blocks, num_hit * self.block_size

    def _longest_hit(self, gi: int, group: KVCacheGroup, hashes: list[bytes]) -> int:
        """How many leading blocks of `hashes` this group can serve from the cache."""
        cached = [self.pool.get_cached_block((gi, h)) is not None for h in hashes]
        if group.window is None:
            return cached.index(False) if False in cached else len(cached)
        # A hit of n blocks needs only the blocks the window of position n * bs sees: a run of
        # `needed` cached blocks ending at n, or a shorter run that starts the sequence.
        needed = cdiv(group.window - 1, self.block_size)
        run = 0
        for i in range(len(cached) - 1, -1, -1):
            run = run + 1 if cached[i] else 0
            if run >= needed:
                return i + run
        return run

    def cache_blocks(self, request: Request) -> None:
        """Registers the request's newly full, computed blocks in the prefix map."""
        if not self.enable_prefix_caching:
            return
        rid = request.request_id
        num_full = request.num_computed_tokens // self.block_size
        start = self._num_registered.get(rid, 0)
        if num_full <= start:
            return
        self._extend_block_hashes(request, num_full * self.block_size)
        for gi, table in enumerate(self._tables[rid]):
            for i in range(start, num_full):
                if table[i] is not self.pool.null_block:
                    self.pool.cache_block(table[i], (gi, request.block_hashes[i]))
        self._num_registered[rid] = num_full

    # --- allocation ----------------------------------------------------------------------------

    def allocate_slots(self, request: Request, num_new_tokens: int,
                       computed_blocks: list[list[KVBlock]] | None = None, num_computed_new: int = 0) -> bool:
        """Makes room for `num_new_tokens` more tokens of `request` (after `num_computed_new` tokens
        reused from the prefix cache, for a request being admitted).

        Returns:
            False, changing nothing the caller relies on, when the pool has too few free blocks.
        """
        rid = request.request_id
        tables = self._tables.get(rid) or [[] for _ in self.groups]
        computed_blocks = computed_blocks or [[] for _ in self.groups]
        num_computed = request.num_computed_tokens + num_computed_new
        num_blocks = cdiv(num_computed + num_new_tokens, self.block_size)
        for group, table in zip(self.groups, tables, strict=True):
            self._free_unseen_blocks(group, table, num_computed)
        needed = [max(0, num_blocks - len(t) - len(c)) for t, c in zip(tables, computed_blocks, strict=True)]
        # Touching a cached block that no request holds takes it off the free list.
        num_reused_free = sum(1 for blocks in computed_blocks for b in blocks if b.ref_cnt == 0)
        if sum(needed) > self.pool.num_free_blocks - num_reused_free:
            return False
        for table, reused, n in zip(tables, computed_blocks, needed, strict=True):
            self.pool.touch(reused)
            table.extend(reused)
            table.extend(self.pool.allocate(n))
        if rid not in self._tables:
            self._tables[rid] = tables
            self._num_registered[rid] = num_computed_new // self.block_size
        return True

    def _free_unseen_blocks(self, group: KVCacheGroup, table: list[KVBlock], num_computed: int) -> None:
        """Sliding window: blocks no query from `num_computed` on can see go back to the pool."""
        if group.window is None:
            return
        num_unseen = group.first_needed_position(num_computed) // self.block_size
        null = self.pool.null_block
        for i in range(min(num_unseen, len(table)) - 1, -1, -1):
            if table[i] is null:
                break  # everything before is null already
            self.pool.free([table[i]])
            table[i] = null

    def free(self, request: Request) -> None:
        """Gives back every block of the request (tail first: the head is the more shareable prefix)."""
        tables = self._tables.pop(request.request_id, None)
        self._num_registered.pop(request.request_id, None)
        for table in tables or ():
            self.pool.free(reversed(table))

    # --- views for the runner and for stats ----------------------------------------------------

    def get_block_ids(self, request_id: str, group_index: int, first_block: int) -> tuple[int, ...]:
        return tuple(b.block_id for b in self._tables[request_id][group_index][first_block:])

    def get_num_blocks_held(self, request_id: str) -> tuple[int, ...]:
        """Per group, the blocks the request holds (null entries not counted)."""
        null = self.pool.null_block
        return tuple(sum(1 for b in t if b is not null) for t in self._tables.get(request_id, [[]] * len(self.groups)))

    @property
    def num_used_blocks(self) -> int:
        return self.pool.num_usable_blocks - self.pool.num_free_blocks
