"""`BlockPool`: the KV blocks of one rank, their reference counts, the LRU free list and the prefix map.

A block is a page of `block_size` token slots in every layer of one KV group. Block 0 is the null
block: it stands in block tables for blocks a sliding window no longer sees and pads gathers; it is
never allocated, freed or written.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Iterable, Sequence

NULL_BLOCK_ID = 0
BlockKey = tuple[int, bytes]  # (KV group index, block hash): the same tokens hold other layers per group


def hash_block(parent: bytes, token_ids: Sequence[int]) -> bytes:
    """The hash of a full block: sha256 over the parent block's hash and this block's tokens, so it
    identifies all the tokens up to the block's end. (A cryptographic hash: a crafted prompt must not
    collide with another user's prefix and read its cached K/V.)"""
    return hashlib.sha256(parent + array("q", token_ids).tobytes()).digest()


class KVBlock:
    __slots__ = ("block_id", "ref_cnt", "cache_key")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_cnt = 0  # requests holding the block
        self.cache_key: BlockKey | None = None  # set once the block is full and registered

    def __repr__(self) -> str:
        return f"KVBlock({self.block_id}, ref={self.ref_cnt}, cached={self.cache_key is not None})"


class BlockPool:
    def __init__(self, num_blocks: int, enable_caching: bool):
        assert num_blocks >= 2, num_blocks
        self.enable_caching = enable_caching
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        self.null_block = self.blocks[NULL_BLOCK_ID]
        self.null_block.ref_cnt = 1  # held forever
        # Free blocks, eviction order first. A freed block that holds a cached prefix goes to the end
        # (least recently used is evicted first); one that holds nothing reusable goes to the front.
        self._free: OrderedDict[int, KVBlock] = OrderedDict((b.block_id, b) for b in self.blocks[1:])
        self._cached: dict[BlockKey, KVBlock] = {}
        # Free blocks that hold a cached prefix, kept as they move: counting them walked every free
        # block, and stats ask for it ten times a second (~70% of an idle rank's CPU on the default model).
        self._num_cached_free = 0

    @property
    def num_usable_blocks(self) -> int:
        return len(self.blocks) - 1

    @property
    def num_free_blocks(self) -> int:
        """Blocks no request holds (evictable cached blocks included)."""
        return len(self._free)

    def get_num_cached_free_blocks(self) -> int:
        """Free blocks that still hold a reusable prefix."""
        return self._num_cached_free

    def get_cached_block(self, key: BlockKey) -> KVBlock | None:
        return self._cached.get(key)

    def allocate(self, num_blocks: int) -> list[KVBlock]:
        """Takes `num_blocks` free blocks (the caller checked there are enough), evicting their prefixes."""
        assert num_blocks <= len(self._free), (num_blocks, len(self._free))
        out = []
        for _ in range(num_blocks):
            _, block = self._free.popitem(last=False)
            if block.cache_key is not None:
                self._num_cached_free -= 1
                if self._cached.get(block.cache_key) is block:
                    del self._cached[block.cache_key]
                block.cache_key = None
            block.ref_cnt = 1
            out.append(block)
        return out

    def touch(self, blocks: Iterable[KVBlock]) -> None:
        """One more holder for each block (a prefix-cache hit); a free one leaves the free list."""
        for block in blocks:
            if block.ref_cnt == 0:
                del self._free[block.block_id]
                self._num_cached_free -= block.cache_key is not None
            block.ref_cnt += 1

    def free(self, blocks: Iterable[KVBlock]) -> None:
        """One holder fewer for each block; pass a request's blocks tail first so that its tail is
        evicted before its (more shareable) head."""
        for block in blocks:
            if block is self.null_block:
                continue
            assert block.ref_cnt > 0, block
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self._free[block.block_id] = block
                if block.cache_key is None:
                    self._free.move_to_end(block.block_id, last=False)
                else:
                    self._num_cached_free += 1

    def cache_block(self, block: KVBlock, key: BlockKey) -> None:
        """Registers a full, computed block under `key` (a first registration wins)."""
        if self.enable_caching and block.cache_key is None and key not in self._cached:
            block.cache_key = key
            self._cached[key] = block
            self._num_cached_free += block.ref_cnt == 0  # (the engine registers blocks it holds)
