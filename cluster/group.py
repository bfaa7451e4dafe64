"""`EPGroup`: G rank actors that together hold one copy of the model and step in lockstep.

The group object lives with its caller (a Serve replica, a batch driver) and is async. One pump task per
rank long-polls the rank's outputs and hands each to the stream of its request, so a step's outputs
cross Ray once per rank, not once per request. A rank that dies or fails fails the whole group: every
open stream ends with `GroupFailedError`, and `restart` builds a new group.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

import ray
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from cluster.config import GroupConfig
from cluster.errors import GroupDrainingError, GroupFailedError
from cluster.placement import Reservation, rank_bundle, reserve
from cluster.rank import (
    LoadProgress,
    RankActor,
    RankFailure,
    RankLoad,
    RankOutput,
    RankStats,
    RequestRejected,
)
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams
from gptoss.errors import InvalidRequestError

logger = logging.getLogger(__name__)

_PROGRESS_PERIOD_S = 1.0
_STOP_TIMEOUT_S = 10.0
_RATE_WINDOW_S = 10.0
_LATENCY_SAMPLES = 4096


@dataclass(frozen=True)
class GroupHealth:
    state: str  # "stopped", "starting", "healthy", "draining", "failed"
    num_ranks: int
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.state == "healthy"


@dataclass(frozen=True)
class GroupStats:
    ranks: tuple[RankStats, ...]
    num_running: int
    num_waiting: int
    num_kv_blocks_used: int
    num_kv_blocks_free: int
    num_open_streams: int
    output_tokens_per_s: float  # delivered to callers over the last few seconds
    token_delivery_p50_ms: float  # from the end of the step that sampled a token to its caller
    token_delivery_p99_ms: float
    expert_token_counts: tuple[tuple[int, ...], ...]  # [layers][experts], summed over ranks


@dataclass
class _Stream:
    rank: int
    generation: int  # which start() of the group the request ran in
    request_id: str  # the caller's id (the ranks see a per-call id)
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    finished: bool = False


class EPGroup:
    """One serving unit: `await start()`, then `generate` concurrently; `stats`, `health`, `abort`,
    `drain`, `restart`, `shutdown`. Must be used from one asyncio event loop."""

    def __init__(self, config: GroupConfig):
        self.config = config
        self.state = "stopped"
        self.error = ""
        self.device = ""
        self._ranks: list = []
        self._reservation: Reservation | None = None
        self._pumps: list[asyncio.Task] = []
        self._streams: dict[str, _Stream] = {}  # by the per-call id the ranks see
        self._open_ids: dict[str, str] = {}  # caller's request id -> per-call id
        self._call_ids = itertools.count()
        self._num_open_per_rank: list[int] = []
        self._rank_load: list[RankLoad] = []
        self._generation = 0
        self._delivered: deque[tuple[float, int]] = deque()
        self._latencies_ms: deque[float] = deque(maxlen=_LATENCY_SAMPLES)

    # --- life cycle ------------------------------------------------------------------------------

    async def start(self, on_progress: Callable[[list[LoadProgress]], None] | None = None) -> None:
        """Reserves the bundles, starts the rank actors, connects them and loads the weights.

        Raises:
            PlacementError: the bundles were not free within `placement_timeout_s` (names what is missing).
            GroupFailedError: a rank failed to load or join, or loading outlasted `load_timeout_s`.
        """
        if self.state not in ("stopped", "failed"):
            raise RuntimeError(f"start needs a stopped or failed group, this one is {self.state}")
        cfg = self.config
        await self._teardown()  # what a failed group left behind
        self.state, self.error = "starting", ""
        gpu = cfg.device == "cuda" or (cfg.device == "auto" and ray.cluster_resources().get("GPU", 0) >= 1)
        bundle = rank_bundle("cuda" if gpu else "cpu", cfg.num_cpus_per_rank)
        try:
            self._reservation = await asyncio.to_thread(reserve, cfg.num_ranks, bundle, cfg.placement_timeout_s,
                                                        f"{cfg.name}-{uuid.uuid4().hex[:8]}")
            actor = ray.remote(RankActor)
            self._ranks = [
                actor.options(
                    num_cpus=cfg.num_cpus_per_rank, num_gpus=1 if gpu else 0, max_concurrency=1000,
                    scheduling_strategy=PlacementGroupSchedulingStrategy(
                        self._reservation.placement_group, placement_group_bundle_index=index),
                ).remote(rank, cfg)
                for rank, index in enumerate(self._reservation.bundle_indices)
            ]
            deadline = time.monotonic() + cfg.load_timeout_s
            try:
                spec, placement = await asyncio.wait_for(self._communicator_plan(), timeout=cfg.load_timeout_s)
            except TimeoutError:
                raise GroupFailedError(f"{cfg.name}: rank 0 did not start within {cfg.load_timeout_s:.0f} s") from None
            loads = [r.load.remote(spec, placement) for r in self._ranks]
            devices = await self._await_loads(loads, on_progress, deadline)
            await asyncio.gather(*(r.begin.remote() for r in self._ranks))
        except BaseException as e:  # cancellation too: nothing may be left reserved
            await asyncio.shield(self._teardown())
            self.state, self.error = "failed", f"start failed: {e!r}"
            if isinstance(e, ray.exceptions.RayError):
                raise GroupFailedError(f"{cfg.name}: start failed: {e}") from e
            raise
        self.device = devices[0]
        self._generation += 1
        self._streams, self._open_ids = {}, {}
        self._num_open_per_rank = [0] * cfg.num_ranks
        self._rank_load = [RankLoad(rank, 0, 0, 0) for rank in range(cfg.num_ranks)]
        self._pumps = [asyncio.create_task(self._pump(rank, r)) for rank, r in enumerate(self._ranks)]
        self.state = "healthy"
        logger.info("%s: %d ranks ready on %s", cfg.name, cfg.num_ranks, self.device)

    async def _communicator_plan(self):
        """(CommunicatorSpec, ExpertPlacement), or (None, None) for a single rank."""
        import gptoss
        from parallel import CommunicatorSpec, ExpertPlacement

        cfg = self.config
        if cfg.num_ranks == 1:
            return None, None
        model_config = await asyncio.to_thread(gptoss.load_config, cfg.checkpoint)
        placement = ExpertPlacement.contiguous(model_config.num_local_experts, cfg.num_ranks)
        device = await self._ranks[0].device_kind.remote()
        backend = cfg.communicator
        if backend == "auto":
            backend = "cupy_nccl" if device == "cuda" else "torch_dist"
        if backend == "cupy_nccl":
            uid = await self._ranks[0].nccl_unique_id.remote()
            return CommunicatorSpec("cupy_nccl", cfg.num_ranks, cfg.collective_timeout_s, nccl_unique_id=uid), placement
        addr, port = await self._ranks[0].rendezvous_address.remote()
        spec = CommunicatorSpec("torch_dist", cfg.num_ranks, cfg.collective_timeout_s, master_addr=addr,
                                master_port=port, torch_backend="nccl" if device == "cuda" else "gloo")
        return spec, placement

    async def _await_loads(self, loads: list, on_progress, deadline: float) -> list[str]:
        pending = list(loads)
        while True:
            done, pending = await asyncio.wait(
                [asyncio.ensure_future(ref) if not isinstance(ref, asyncio.Future) else ref for ref in pending],
                timeout=_PROGRESS_PERIOD_S)
            for future in done:
                future.result()  # a rank's load error surfaces here
            if not pending:
                return [await ref for ref in loads]
            try:  # a rank that is not scheduled yet cannot answer: do not wait on it
                progress = await asyncio.wait_for(
                    asyncio.gather(*(r.progress.remote() for r in self._ranks)), timeout=_PROGRESS_PERIOD_S)
            except TimeoutError:
                progress = None
            if progress is not None:
                if on_progress is not None:
                    on_progress(progress)
                logger.info("%s: loading: %s", self.config.name, ", ".join(
                    f"rank {p.rank} {p.stage} {p.tensors_done}/{p.tensors_total}" for p in progress))
            if time.monotonic() > deadline:
                slow = [p.rank for p in progress if p.stage != "ready"] if progress else "some"
                raise GroupFailedError(f"{self.config.name}: ranks {slow} did not finish loading within "
                                       f"{self.config.load_timeout_s:.0f} s")

    async def shutdown(self) -> None:
        """Stops every rank and releases the placement group; open streams end with GroupDrainingError."""
        failed = self.state == "failed"
        self.state = "stopping"
        self._end_streams(GroupDrainingError(f"{self.config.name} was shut down"))
        await self._teardown()
        self.state = "failed" if failed else "stopped"

    async def restart(self) -> None:
        """A new group in place of this one: new actors, new communicator, same config."""
        await self.shutdown()
        self.state = "stopped"
        await self.start()

    async def drain(self, timeout_s: float) -> None:
        """Stops admitting, lets open requests finish for up to `timeout_s`, aborts the rest, shuts down."""
        if self.state == "healthy":
            self.state = "draining"
        deadline = time.monotonic() + timeout_s
        try:
            while self._streams and time.monotonic() < deadline and self.state == "draining":
                await asyncio.sleep(0.05)
            for request_id in list(self._open_ids):
                await self.abort(request_id)
            settle = time.monotonic() + 1.0  # let the aborted streams get their last output
            while self._streams and time.monotonic() < settle:
                await asyncio.sleep(0.02)
        finally:
            await self.shutdown()

    async def _teardown(self) -> None:
        for pump in self._pumps:
            pump.cancel()
        self._pumps = []
        ranks, self._ranks = self._ranks, []
        if ranks:
            # Ask the loops to stop together (clean communicator close), then make sure.
            stops = [asyncio.ensure_future(r.stop.remote()) for r in ranks]
            await asyncio.wait(stops, timeout=_STOP_TIMEOUT_S)
            for r in ranks:
                ray.kill(r, no_restart=True)
        if self._reservation is not None:
            self._reservation.release()
            self._reservation = None

    # --- requests --------------------------------------------------------------------------------

    async def generate(self, request_id: str, prompt_token_ids: Sequence[int],
                       sampling: SamplingParams | None = None) -> AsyncIterator[RequestOutput]:
        """Streams the request's outputs as they are sampled; the last one has the finish reason.

        Leaving the loop early (or the caller going away) aborts the request.
        Raises:
            InvalidRequestError: the engine rejected the request (names the field).
            GroupFailedError: the group lost a rank while the request ran, or is failed.
            GroupDrainingError: the group is draining or stopped.
        """
        self._check_admitting()
        if request_id in self._open_ids:
            raise InvalidRequestError("request_id", f"request_id must be unique among running requests, "
                                                    f"got {request_id!r} twice")
        # The ranks see a per-call id, so a retried request id never receives a predecessor's late outputs.
        engine_id = f"{request_id}#{next(self._call_ids)}"
        rank = self._pick_rank()
        stream = self._streams[engine_id] = _Stream(rank, self._generation, request_id)
        self._open_ids[request_id] = engine_id
        self._num_open_per_rank[rank] += 1
        try:
            try:
                await self._ranks[rank].add_request.remote(engine_id, list(prompt_token_ids),
                                                           sampling or SamplingParams())
            except ray.exceptions.RayError as e:
                self._fail(f"rank {rank} unreachable: {e}")
            for other, handle in enumerate(self._ranks):
                if other != rank:
                    handle.wake.remote()  # so idle peers join the next step at once
            while True:
                item = await stream.queue.get()
                if isinstance(item, Exception):
                    raise item
                if item.finished:
                    stream.finished = True
                yield dataclasses.replace(item, request_id=request_id)
                if stream.finished:
                    return
        finally:
            if stream.generation == self._generation:  # not a leftover of a group since restarted
                self._streams.pop(engine_id, None)
                self._open_ids.pop(request_id, None)
                self._num_open_per_rank[rank] -= 1
                if not stream.finished and self.state in ("healthy", "draining"):
                    self._ranks[rank].abort.remote(engine_id)

    async def abort(self, request_id: str) -> None:
        """Ends the request: its stream gets a last output with finish_reason "abort"."""
        stream = self._streams.get(self._open_ids.get(request_id, ""))
        if stream is None or stream.rank >= len(self._ranks):
            return
        try:
            await self._ranks[stream.rank].abort.remote(self._open_ids[request_id])
        except ray.exceptions.RayError as e:
            self._fail(f"rank {stream.rank} unreachable: {e}")

    def _check_admitting(self) -> None:
        if self.state == "failed":
            raise GroupFailedError(f"{self.config.name} has failed ({self.error}); restart it")
        if self.state != "healthy":
            raise GroupDrainingError(f"{self.config.name} is {self.state} and admits no requests")

    def _pick_rank(self) -> int:
        """The rank with the fewest open requests (counted here, so exact at once); ties go to the
        most free KV blocks, then the fewest waiting, as the ranks last reported."""
        def load(rank: int) -> tuple:
            report = self._rank_load[rank]
            return self._num_open_per_rank[rank], -report.num_kv_blocks_free, report.num_waiting, rank

        return min(range(len(self._ranks)), key=load)

    async def _pump(self, rank: int, handle) -> None:
        try:
            while True:
                items = await handle.take_outputs.remote()
                now = time.time()
                for item in items:
                    if isinstance(item, RankOutput):
                        self._deliver(item, now)
                    elif isinstance(item, RequestRejected):
                        stream = self._streams.get(item.request_id)
                        if stream is not None:
                            stream.finished = True  # nothing to abort
                            stream.queue.put_nowait(InvalidRequestError(item.param, item.message))
                    elif isinstance(item, RankLoad):
                        self._rank_load[rank] = item
                    elif isinstance(item, RankFailure):
                        self._fail(f"rank {item.rank} failed: {item.message}")
                        return
        except asyncio.CancelledError:
            raise
        except ray.exceptions.RayError as e:
            self._fail(f"rank {rank} died: {type(e).__name__}")
        except Exception as e:  # a bug here must not leave streams waiting for ever
            logger.exception("%s: output pump of rank %d failed", self.config.name, rank)
            self._fail(f"rank {rank} output pump failed: {e!r}")

    def _deliver(self, item: RankOutput, now: float) -> None:
        output = item.output
        self._latencies_ms.append((now - item.sampled_at_s) * 1000)
        self._delivered.append((now, len(output.new_token_ids)))
        while self._delivered[0][0] < now - _RATE_WINDOW_S:
            self._delivered.popleft()
        stream = self._streams.get(output.request_id)
        if stream is not None:
            stream.queue.put_nowait(output)

    def _fail(self, reason: str) -> None:
        if self.state in ("failed", "stopping", "stopped"):  # a shutdown's own kills are no failure
            return
        self.state, self.error = "failed", reason
        logger.error("%s failed: %s", self.config.name, reason)
        self._end_streams(GroupFailedError(f"{self.config.name} failed: {reason}"))

    def _end_streams(self, error: Exception) -> None:
        for stream in self._streams.values():
            stream.queue.put_nowait(error)

    # --- observability ---------------------------------------------------------------------------

    def health(self) -> GroupHealth:
        return GroupHealth(self.state, self.config.num_ranks, self.error)

    async def stats(self) -> GroupStats:
        if not self._ranks:
            raise GroupDrainingError(f"{self.config.name} is {self.state}: no ranks to ask")
        ranks = tuple(await asyncio.gather(*(r.stats.remote() for r in self._ranks)))
        now = time.time()
        while self._delivered and self._delivered[0][0] < now - _RATE_WINDOW_S:
            self._delivered.popleft()
        span = now - self._delivered[0][0] if self._delivered else 0.0
        rate = sum(n for _, n in self._delivered) / max(span, 1e-3) if len(self._delivered) > 1 else 0.0
        latencies = sorted(self._latencies_ms)

        def pct(q: float) -> float:
            return latencies[min(len(latencies) - 1, int(q * len(latencies)))] if latencies else 0.0

        counts = [list(row) for row in ranks[0].expert_token_counts] if ranks[0].expert_token_counts else []
        for r in ranks[1:]:
            for layer, row in enumerate(r.expert_token_counts):
                counts[layer] = [a + b for a, b in zip(counts[layer], row, strict=True)]
        return GroupStats(
            ranks=ranks,
            num_running=sum(r.engine.num_running for r in ranks),
            num_waiting=sum(r.engine.num_waiting for r in ranks),
            num_kv_blocks_used=sum(r.engine.num_kv_blocks_used for r in ranks),
            num_kv_blocks_free=sum(r.engine.num_kv_blocks_free for r in ranks),
            num_open_streams=len(self._streams),
            output_tokens_per_s=rate,
            token_delivery_p50_ms=pct(0.5),
            token_delivery_p99_ms=pct(0.99),
            expert_token_counts=tuple(tuple(row) for row in counts),
        )
