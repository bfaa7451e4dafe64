"""`PrefixAffinityRouter`: the Ray Serve request router that picks a model server replica (an EP group)
for each request.

A request goes to the group that was sent its prompt's longest prefix before (that group most likely
still holds those KV blocks in its prefix cache: keyed by `engine.routing.prefix_routing_keys` of the
prompt's token ids, the same keys the group uses to pick a rank), unless that group is much busier
than the least busy one (`max_extra_requests` more open requests) or short of free KV blocks: then the
load wins, and a hot prefix spills over to a second group. A prompt no group has seen goes to the
least busy group. Requests without keys fall back to power-of-two choices on Serve's own queue
lengths.

Load is what this router knows exactly (the requests it has in flight on each replica) combined with
what the replicas publish through `record_routing_stats` (running, waiting, free KV blocks, health)
and Serve's queue-length probes. A replica is skipped when the request names it in
`avoid_replica_ids` (the gateway saw its group fail: a retry, or a new request soon after) or it
published itself unhealthy, until Serve replaces it.

One router runs in each process that holds a handle to the model server (each gateway replica): each
remembers the prefixes it routed itself. Both routers (this one, and Serve's power-of-two choices for
`router.policy: power_of_two`) publish the replica set Serve gives them (serve/replica_sets.py): a
replica that leaves it is being stopped (scaled down, redeployed), and the gateway moves its streams.
"""

from __future__ import annotations

import logging
import random
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from ray.serve._private.request_router.pow_2_router import PowerOfTwoChoicesRequestRouter
from ray.serve.request_router import FIFOMixin, PendingRequest, ReplicaID, RequestRouter, RunningReplica

from engine.routing import PrefixAffinity
from serve import replica_sets

logger = logging.getLogger("ray.serve")

_CHOSEN_S = 5.0  # a choice not confirmed routed within this long was dropped (cancelled, retried)


@dataclass(frozen=True)
class ReplicaLoad:
    """What a replica publishes through `record_routing_stats` (a plain dict on the wire)."""

    healthy: bool
    num_running: int
    num_waiting: int
    num_kv_blocks_free: int
    num_kv_blocks: int
    published_at_s: float  # the replica's time.time()

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_stats(cls, stats: dict[str, Any] | None, max_age_s: float) -> ReplicaLoad | None:
        """The published figures, or None when missing, malformed or older than `max_age_s`."""
        if not stats:
            return None
        try:
            load = cls(**{k: stats[k] for k in cls.__dataclass_fields__})
        except (KeyError, TypeError):
            return None
        if time.time() - load.published_at_s > max_age_s:
            return None
        return load


class PublishesReplicaSet:
    """Mixed into a RequestRouter: publishes each replica set Serve gives it to
    `serve.replica_sets.REPLICA_SETS` (looked up when called: Serve ships this module by value, which
    would otherwise give the router a copy of the registry the gateway does not listen to)."""

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        deployment = self._deployment_id
        replica_sets.REPLICA_SETS.publish(replica_sets.deployment_key(deployment.app_name, deployment.name),
                                          (r.replica_id.unique_id for r in replicas))


class PowerOfTwoRouter(PublishesReplicaSet, PowerOfTwoChoicesRequestRouter):
    """Serve's default router (`router.policy: power_of_two`), publishing its replica set."""


class PrefixAffinityRouter(PublishesReplicaSet, FIFOMixin, RequestRouter):
    def initialize_state(self, max_extra_requests: int = 16, max_keys: int = 200_000,
                         stats_max_age_s: float = 10.0, **kwargs) -> None:
        self.max_extra_requests = max_extra_requests
        self.stats_max_age_s = stats_max_age_s
        self.affinity = PrefixAffinity(max_keys)
        self._in_flight: dict[ReplicaID, int] = defaultdict(int)
        self._replica_of: dict[str, ReplicaID] = {}  # internal request id -> replica
        # Chosen but not yet confirmed routed (Serve awaits the replica's acceptance in between): counted
        # as load, so a burst of requests decided together does not all pick the same replica.
        self._chosen: dict[str, tuple[ReplicaID, float]] = {}
        self._known: set[ReplicaID] = set()

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if pending_request is not None:
            pending_request.routing_context.should_backoff = True  # back off between rounds, never spin
        self._forget_gone(candidate_replicas)
        candidates = self._usable(candidate_replicas, _model_request_field(pending_request, "avoid_replica_ids"))
        if not candidates:
            return []
        keys = request_prefix_keys(pending_request)
        if not keys:
            return [self._power_of_two(candidates)]
        by_id = {r.replica_id: r for r in candidates}
        loads = self._loads(candidates)
        least = min(candidates, key=lambda r: (loads[r.replica_id], random.random()))
        affine_id, _ = self.affinity.lookup(keys, allowed=set(by_id))
        if affine_id is None:
            ranks = [[least], self._power_of_two(candidates)]
        elif loads[affine_id] - loads[least.replica_id] > self.max_extra_requests or self._short_of_kv(
                by_id[affine_id], keys):
            ranks = [[least], [by_id[affine_id]]]  # the load wins; the affine group is the fallback
        else:
            ranks = [[by_id[affine_id]], [least]]
        self._chosen[pending_request.metadata.internal_request_id] = (ranks[0][0].replica_id, time.monotonic())
        return ranks

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result) -> None:
        keys = request_prefix_keys(pending_request)
        if keys:
            self.affinity.record(keys, replica_id)
        request_id = pending_request.metadata.internal_request_id
        self._chosen.pop(request_id, None)
        if request_id not in self._replica_of:
            self._replica_of[request_id] = replica_id
            self._in_flight[replica_id] += 1

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        replica = self._replica_of.pop(internal_request_id, None)
        if replica is not None:
            self._in_flight[replica] = max(0, self._in_flight[replica] - 1)

    # --- helpers ---------------------------------------------------------------------------------

    def _usable(self, candidates: list[RunningReplica], avoid: tuple[str, ...]) -> list[RunningReplica]:
        """Candidates without a known-failed group (all of them when every one looks failed: a stale
        mark must not stop all traffic)."""
        usable = []
        for r in candidates:
            load = ReplicaLoad.from_stats(r.routing_stats, self.stats_max_age_s)
            if r.replica_id.unique_id in avoid or (load is not None and not load.healthy):
                continue
            usable.append(r)
        return usable or list(candidates)

    def _loads(self, candidates: list[RunningReplica]) -> dict[ReplicaID, float]:
        """Open requests per replica: the more of what this router has in flight or just chose there
        (exact, at once) and what Serve last saw ongoing there (all callers' requests, as of the last
        acceptance or probe). The published running + waiting lag by a stats period or more, so they
        only break ties."""
        now = time.monotonic()
        self._chosen = {rid: (replica, at) for rid, (replica, at) in self._chosen.items() if now - at < _CHOSEN_S}
        chosen: dict[ReplicaID, int] = defaultdict(int)
        for replica, _ in self._chosen.values():
            chosen[replica] += 1
        loads = {}
        for r in candidates:
            figures = [self._in_flight.get(r.replica_id, 0) + chosen[r.replica_id]]
            queued = self.replica_queue_len_cache.get(r.replica_id)
            if queued is not None:
                figures.append(queued)
            load = ReplicaLoad.from_stats(r.routing_stats, self.stats_max_age_s)
            published = (load.num_running + load.num_waiting) if load is not None else 0
            loads[r.replica_id] = max(figures) + published / 1e6
        return loads

    def _short_of_kv(self, replica: RunningReplica, keys: tuple[bytes, ...]) -> bool:
        """Whether the group published too few free KV blocks for even this prompt's prefix."""
        load = ReplicaLoad.from_stats(replica.routing_stats, self.stats_max_age_s)
        return load is not None and load.num_kv_blocks_free < len(keys)

    def _power_of_two(self, candidates: list[RunningReplica]) -> list[RunningReplica]:
        """Two random candidates; Serve sends to the one with the shorter queue."""
        return random.sample(candidates, min(2, len(candidates)))

    def _forget_gone(self, candidates: list[RunningReplica]) -> None:
        """A replica that left (replaced after a failure, scaled down) took its cache with it."""
        current = {r.replica_id for r in candidates}
        for gone in self._known - current:
            self.affinity.forget(gone)
            self._in_flight.pop(gone, None)
        self._known = current


def request_prefix_keys(pending_request: PendingRequest | None) -> tuple[bytes, ...]:
    """The prefix routing keys a `ModelRequest` carries (the gateway computed them), if this is one."""
    return _model_request_field(pending_request, "prefix_keys")


def _model_request_field(pending_request: PendingRequest | None, name: str) -> tuple:
    """A tuple field of the request's `ModelRequest` argument; () for other calls (stats, health)."""
    if pending_request is None or not pending_request.args:
        return ()
    value = getattr(pending_request.args[0], name, ())
    return value if isinstance(value, tuple) else ()
