"""The Responses API's store: stored responses by id, for `GET`/`DELETE /v1/responses/{id}`, their input
items, and `previous_response_id`.

One Serve deployment per application (one replica, no CPU of its own), so every gateway replica sees the
same responses and a gateway replica's restart loses none; it goes away with its application. Bounded
by entries and by bytes, the least recently used response evicted first. A response belongs to the
tenant whose key created it: to any other tenant it does not exist (404, as for an unknown id).
Records are JSON bytes made by the gateway, so their size is what they hold. The methods are coroutines
that never await in between: they run one at a time on the replica's event loop (Serve runs plain
methods on a thread pool, where two calls could interleave inside the LRU).
"""

from __future__ import annotations

import logging
from collections import OrderedDict

logger = logging.getLogger("ray.serve")


class ResponseStore:
    """Response id -> (tenant, record as JSON bytes), least recently used first."""

    def __init__(self, max_entries: int, max_bytes: int):
        self.max_entries, self.max_bytes = max_entries, max_bytes
        self._records: OrderedDict[str, tuple[str, bytes]] = OrderedDict()
        self._bytes = 0
        self.num_evicted = 0

    async def put(self, response_id: str, tenant: str, record: bytes) -> bool:
        """Keeps the record (evicting the least recently used ones to make room); False when it alone is
        larger than the store."""
        await self.delete(response_id, tenant)
        if len(record) > self.max_bytes:
            logger.warning("response %s (%d bytes) is larger than the response store (%d bytes): not stored",
                           response_id, len(record), self.max_bytes)
            return False
        self._records[response_id] = (tenant, record)
        self._bytes += len(record)
        while len(self._records) > self.max_entries or self._bytes > self.max_bytes:
            _, (_, evicted) = self._records.popitem(last=False)
            self._bytes -= len(evicted)
            self.num_evicted += 1
        return True

    async def get(self, response_id: str, tenant: str) -> bytes | None:
        """The tenant's record (now the most recently used), or None."""
        entry = self._records.get(response_id)
        if entry is None or entry[0] != tenant:
            return None
        self._records.move_to_end(response_id)
        return entry[1]

    async def delete(self, response_id: str, tenant: str) -> bool:
        entry = self._records.get(response_id)
        if entry is None or entry[0] != tenant:
            return False
        del self._records[response_id]
        self._bytes -= len(entry[1])
        return True

    async def stats(self) -> dict[str, int]:
        return {"entries": len(self._records), "bytes": self._bytes, "evicted": self.num_evicted}
