"""Abort by request id with several gateway replicas: Serve routes a gRPC `Abort` to any gateway replica,
but only the one running the `Generate` can end it. An `AbortRegistry` actor per application knows which
replica runs each abortable request, keyed by (tenant, request id), and passes an abort to that replica,
which long-polls it for the aborts meant for it.

With one gateway replica none of this is used: the replica aborts its own requests.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections import defaultdict

import ray

logger = logging.getLogger("ray.serve")

_ANSWER_TIMEOUT_S = 5.0  # an owner that does not answer in this long is gone (replaced, stopping)
_POLL_S = 30.0  # a take() with nothing to give returns after this, so a dead caller's poll ends


@ray.remote(num_cpus=0, max_concurrency=1000)
class AbortRegistry:
    """Request (tenant, id) -> the gateway replica running it; aborts queued for each replica."""

    def __init__(self) -> None:
        self._owners: dict[tuple[str, str], str] = {}
        self._inboxes: dict[str, asyncio.Queue] = defaultdict(asyncio.Queue)
        self._answers: dict[int, asyncio.Future] = {}
        self._tokens = itertools.count()

    def register(self, tenant: str, request_id: str, owner: str) -> None:
        self._owners[(tenant, request_id)] = owner

    def unregister(self, tenant: str, request_id: str, owner: str) -> None:
        if self._owners.get((tenant, request_id)) == owner:
            del self._owners[(tenant, request_id)]

    async def abort(self, tenant: str, request_id: str) -> bool:
        """Whether the replica running the tenant's request ended it (False: no such request)."""
        owner = self._owners.get((tenant, request_id))
        if owner is None:
            return False
        token = next(self._tokens)
        answer = self._answers[token] = asyncio.get_running_loop().create_future()
        self._inboxes[owner].put_nowait((token, tenant, request_id))
        try:
            return await asyncio.wait_for(answer, _ANSWER_TIMEOUT_S)
        except TimeoutError:
            logger.warning("abort of a request of replica %s: no answer within %g s", owner, _ANSWER_TIMEOUT_S)
            return False
        finally:
            self._answers.pop(token, None)

    async def take(self, owner: str) -> list[tuple[int, str, str]]:
        """The aborts queued for `owner` (waits up to a poll period for one)."""
        inbox = self._inboxes[owner]
        try:
            first = await asyncio.wait_for(inbox.get(), _POLL_S)
        except TimeoutError:
            return []
        items = [first]
        while not inbox.empty():
            items.append(inbox.get_nowait())
        return items

    def answer(self, token: int, aborted: bool) -> None:
        future = self._answers.get(token)
        if future is not None and not future.done():
            future.set_result(aborted)


def get_registry(app_name: str):
    """The application's registry actor, created by the first gateway replica that asks (detached: it
    outlives any one replica; one idle actor without CPUs per application)."""
    return AbortRegistry.options(name=f"gptoss-aborts:{app_name}", namespace="gptoss-serve", lifetime="detached",
                                 get_if_exists=True).remote()
