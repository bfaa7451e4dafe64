"""Prefix affinity: which worker most likely holds a prompt's leading KV blocks in its prefix cache.

Two levels route requests: the Serve request router picks an EP group (serve/router.py), and the group
picks a rank (cluster/group.py). Both key on `prefix_routing_keys` of the same token ids and block
size, so a conversation whose turns share a prefix lands on the same rank of the same group, where
the engine finds its blocks cached.

The keys are not the engine's block hashes: those are seeded with a per-engine secret (so nothing
outside the engine can probe the cache), while routing keys must agree across processes. They are
salted the same way (the tenant), so one tenant's prompts never steer another's routing.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Hashable, Sequence

DEFAULT_MAX_ROUTING_BLOCKS = 256  # 4096 tokens at block size 16: enough to tell conversations apart


def prefix_routing_keys(token_ids: Sequence[int], block_size: int, cache_salt: str = "",
                        max_blocks: int = DEFAULT_MAX_ROUTING_BLOCKS) -> tuple[bytes, ...]:
    """One key per full leading block (at most `max_blocks`); key i identifies tokens [0, (i+1) * block_size)
    under the salt, chained like the engine's block hashes (8-byte blake2b: routing needs no secrecy)."""
    num_blocks = min(len(token_ids) // block_size, max_blocks)
    parent = hashlib.blake2b(cache_salt.encode(), digest_size=8).digest()
    keys = []
    for i in range(num_blocks):
        block = array("q", token_ids[i * block_size:(i + 1) * block_size]).tobytes()
        parent = hashlib.blake2b(parent + block, digest_size=8).digest()
        keys.append(parent)
    return tuple(keys)


class PrefixAffinity:
    """Remembers which owner (a rank, a replica) each routing key was last sent to, least recently
    used forgotten first; `lookup` finds the owner of the longest remembered prefix."""

    def __init__(self, max_keys: int = 200_000):
        self.max_keys = max_keys
        self._owner_of: OrderedDict[bytes, Hashable] = OrderedDict()

    def __len__(self) -> int:
        return len(self._owner_of)

    def lookup(self, keys: Sequence[bytes], allowed: set | None = None) -> tuple[Hashable | None, int]:
        """(owner of the longest remembered prefix among `allowed`, the number of blocks it covers);
        (None, 0) when no prefix is remembered."""
        for n in range(len(keys), 0, -1):
            owner = self._owner_of.get(keys[n - 1])
            if owner is not None and (allowed is None or owner in allowed):
                return owner, n
        return None, 0

    def record(self, keys: Sequence[bytes], owner: Hashable) -> None:
        """The request with these keys went to `owner`: it will hold them in its cache."""
        for key in keys:
            self._owner_of[key] = owner
            self._owner_of.move_to_end(key)
        while len(self._owner_of) > self.max_keys:
            self._owner_of.popitem(last=False)

    def forget(self, owner: Hashable) -> None:
        """The owner went away (a replica replaced, a group restarted): its cache is gone."""
        for key in [k for k, o in self._owner_of.items() if o == owner]:
            del self._owner_of[key]
