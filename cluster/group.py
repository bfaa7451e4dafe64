"""`EPGroup`: G rank actors that together hold one copy of the model and step in lockstep.

The group object lives with its caller (a Serve replica, a batch driver) and is async. One pump task per
rank long-polls the rank's outputs and hands each to the stream of its request, so a step's outputs
cross Ray once per rank, not once per request. A rank that dies, fails or gets stuck fails the whole
group: every open stream ends with `GroupFailedError`, and `restart` (or `start` again) builds a new one.

Life cycle: `start`, `shutdown`, `drain` and `restart` run one at a time (one lock); `shutdown` and
`drain` cancel a `start` in progress, which releases whatever it had reserved. States: "stopped" ->
"starting" -> "healthy" -> ("draining" ->) "stopping" -> "stopped"; "failed" from anywhere a rank fails.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

import ray
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from cluster.config import GroupConfig
from cluster.errors import GroupDrainingError, GroupFailedError, SuspectRequestError
from cluster.placement import Reservation, rank_bundle, reserve, wait_placed
from cluster.rank import (
    EplbStats,
    LoadProgress,
    RankActor,
    RankBusyness,
    RankFailure,
    RankHeartbeat,
    RankOutput,
    RankRequest,
    RankStats,
    RequestRejected,
)
from cluster.ray_calls import submit_outside_current_task
from cluster.telemetry import Percentiles, RateWindow, one_way_s, token_delivery_s
from engine.outputs import RequestOutput
from engine.routing import PrefixAffinity, prefix_routing_keys
from engine.sampling_params import SamplingParams
from gptoss.errors import InvalidRequestError
from parallel.rebalance import Rearrangement

logger = logging.getLogger(__name__)

_PROGRESS_PERIOD_S = 1.0
_STOP_TIMEOUT_S = 10.0
_HEARTBEAT_PERIOD_S = 1.0
_STATS_TIMEOUT_S = 5.0  # a frozen rank must not hang stats(): its figures are left out
_DRAIN_POLL_S = 0.05


@dataclass(frozen=True)
class GroupHealth:
    state: str  # "stopped", "starting", "healthy", "draining", "stopping", "failed"
    num_ranks: int
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.state == "healthy"


@dataclass(frozen=True)
class GroupStats:
    name: str  # the group's config.name
    state: str
    ranks: tuple[RankStats, ...]  # the ranks that answered (none while starting or stopped)
    num_running: int
    num_waiting: int
    num_kv_blocks_used: int
    num_kv_blocks_free: int
    num_open_streams: int
    output_tokens_per_s: float  # delivered to callers over the last few seconds
    # From the end of the step that sampled a token to its caller: the token's age on the rank when
    # sent plus half the poll's Ray round trip, each measured on one clock (never across machines).
    token_delivery_p50_ms: float
    token_delivery_p99_ms: float
    expert_token_counts: tuple[tuple[int, ...], ...]  # [layers][experts], summed over ranks
    placement_group_id: str  # hex id of the placement group the ranks run in; "" when none
    eplb: EplbStats | None = None  # rank 0's figures, pauses the slowest rank's; None when EPLB is off


@dataclass
class _Stream:
    rank: int
    generation: int  # which start() of the group the request ran in
    request_id: str  # the caller's id (the ranks see a per-call id)
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    finished: bool = False
    forward: Callable[[RequestOutput], None] | None = None  # takes every output but the last (generate)


class _RankRequests:
    """Hands one rank its new requests: one `add_requests` call at a time, carrying every request that came
    while the previous call was under way, so a wave of arrivals costs a few actor calls, not one each
    (~1 ms of CPU per call in the caller and more in the rank, whose GIL its engine thread needs, on 2
    cores).
    The first request of a quiet spell goes at once. After each call the other ranks are woken, so idle
    peers join the next step at once."""

    def __init__(self, handle, peers: list):
        self._handle, self._peers = handle, peers
        self._waiting: list[tuple[RankRequest, asyncio.Future]] = []
        self._sender: asyncio.Task | None = None

    async def add(self, request: RankRequest) -> None:
        """Returns once the rank has queued the request. Raises the call's error (a RayError). A caller
        that leaves before its request was sent takes it out of the call."""
        future = asyncio.get_running_loop().create_future()
        self._waiting.append((request, future))
        if self._sender is None:
            self._sender = asyncio.create_task(self._send())
        await future

    async def _send(self) -> None:
        batch: list[tuple[RankRequest, asyncio.Future]] = []
        try:
            while self._waiting:
                batch = [(request, future) for request, future in self._waiting if not future.done()]
                self._waiting = []
                if not batch:
                    continue
                try:
                    await self._handle.add_requests.remote([request for request, _ in batch])
                except Exception as e:  # noqa: BLE001 - each caller raises it
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(e)
                    continue
                for _, future in batch:
                    if not future.done():
                        future.set_result(None)
                for peer in self._peers:
                    peer.wake.remote()
        finally:
            self._sender = None
            for _, future in [*batch, *self._waiting]:  # cancelled itself (the loop is closing)
                future.cancel()


class EPGroup:
    """One serving unit: `await start()`, then `generate` concurrently; `stats`, `health`, `abort`,
    `drain`, `restart`, `shutdown`. Must be used from one asyncio event loop."""

    def __init__(self, config: GroupConfig):
        self.config = config
        self.state = "stopped"
        self.error = ""
        self.device = ""
        self._lifecycle = asyncio.Lock()
        self._start_task: asyncio.Task | None = None
        self._num_closing = 0  # shutdown() calls waiting for or holding the lifecycle lock
        self._ranks: list = []
        self._reservation: Reservation | None = None
        self._tasks: list[asyncio.Task] = []  # output pumps and the step watchdog
        self._streams: dict[str, _Stream] = {}  # by the per-call id the ranks see
        self._open_ids: dict[str, str] = {}  # caller's request id -> per-call id
        self._call_ids = itertools.count()
        self._rebalance_asks = itertools.count(1)  # numbers each rebalance_experts call for the ranks
        self._num_open_per_rank: list[int] = []
        self._rank_requests: list[_RankRequests] = []
        self._busyness: list[RankBusyness] = []
        self._affinity = PrefixAffinity()  # prompt prefix -> the rank that holds it (reset by each start)
        self._generation = 0
        self._token_rate = RateWindow()
        self._delivery_ms = Percentiles()
        self._one_way_s: list[float] = []  # per rank: the transport to here, half a heartbeat's round trip

    # --- life cycle ------------------------------------------------------------------------------

    async def start(self, on_progress: Callable[[list[LoadProgress]], None] | None = None) -> None:
        """Reserves the bundles, starts the rank actors, connects them and loads the weights.

        Raises:
            PlacementError: the bundles were not free within `placement_timeout_s` (names what is missing).
            GroupFailedError: a rank failed to start, load or join, or outlasted its deadline.
            GroupDrainingError: `shutdown` or `drain` was called meanwhile (nothing is left reserved).
        """
        async with self._lifecycle:
            await self._start_locked(on_progress)

    async def _start_locked(self, on_progress) -> None:
        if self._num_closing:
            raise GroupDrainingError(f"{self.config.name} is being shut down")
        if self.state not in ("stopped", "failed"):
            raise RuntimeError(f"start needs a stopped or failed group, this one is {self.state}")
        await self._teardown()  # what a failed group left behind
        self.state, self.error = "starting", ""
        task = self._start_task = asyncio.create_task(self._bring_up(on_progress))
        try:
            await task
        except asyncio.CancelledError:
            if asyncio.current_task().cancelling():  # our caller was cancelled: not ours to translate
                raise
            raise GroupDrainingError(f"{self.config.name} was shut down while starting") from None
        finally:
            self._start_task = None

    async def _bring_up(self, on_progress) -> None:
        cfg = self.config
        try:
            gpu = cfg.device == "cuda" or (cfg.device == "auto" and ray.cluster_resources().get("GPU", 0) >= 1)
            bundle = rank_bundle("cuda" if gpu else "cpu", cfg.num_cpus_per_rank)
            # Held before waiting, so a cancel or a timeout below releases it in _teardown.
            self._reservation = reserve(cfg.num_ranks, bundle, f"{cfg.name}-{uuid.uuid4().hex[:8]}")
            await wait_placed(self._reservation, bundle, cfg.placement_timeout_s)
            actor = ray.remote(RankActor)
            self._ranks = [
                actor.options(
                    num_cpus=cfg.num_cpus_per_rank, num_gpus=1 if gpu else 0, max_concurrency=1000,
                    scheduling_strategy=PlacementGroupSchedulingStrategy(
                        self._reservation.placement_group, placement_group_bundle_index=index),
                ).remote(rank, cfg)
                for rank, index in enumerate(self._reservation.bundle_indices)
            ]
            devices = await self._await_ranks_started()
            spec, placement = await self._communicator_plan(devices[0])
            loads = [r.load.remote(spec, placement) for r in self._ranks]
            await self._await_loads(loads, on_progress, time.monotonic() + cfg.load_timeout_s)
            await asyncio.gather(*(r.begin.remote() for r in self._ranks))
        except BaseException as e:  # cancellation too: nothing may be left reserved
            await asyncio.shield(self._teardown())
            if isinstance(e, asyncio.CancelledError):
                self.state, self.error = "stopped", "start was cancelled"
                raise
            self.state, self.error = "failed", f"start failed: {e!r}"
            if isinstance(e, ray.exceptions.RayError):
                raise GroupFailedError(f"{cfg.name}: start failed: {e}") from e
            raise
        self.device = devices[0]
        self._generation += 1
        self._streams, self._open_ids = {}, {}
        self._num_open_per_rank = [0] * cfg.num_ranks
        self._rank_requests = [_RankRequests(handle, [peer for peer in self._ranks if peer is not handle])
                               for handle in self._ranks]
        self._busyness = [RankBusyness(rank, 0, 0, 0) for rank in range(cfg.num_ranks)]
        self._one_way_s = [0.0] * cfg.num_ranks
        self._affinity = PrefixAffinity()
        self._tasks = [asyncio.create_task(self._pump(rank, r)) for rank, r in enumerate(self._ranks)]
        self._tasks.append(asyncio.create_task(self._watch_steps()))
        self.state = "healthy"
        logger.info("%s: %d ranks ready on %s", cfg.name, cfg.num_ranks, self.device)

    async def _await_ranks_started(self) -> list[str]:
        """Every rank actor's device kind, once all answer: none joins the communicator before."""
        cfg = self.config
        started = [asyncio.ensure_future(r.ready.remote()) for r in self._ranks]
        _, pending = await asyncio.wait(started, timeout=cfg.start_timeout_s)
        if pending:
            for future in pending:
                future.cancel()
            slow = [rank for rank, future in enumerate(started) if future in pending]
            raise GroupFailedError(f"{cfg.name}: ranks {slow} did not start within start_timeout_s="
                                   f"{cfg.start_timeout_s:g} s (a cold node may need longer)")
        return [future.result() for future in started]

    async def _communicator_plan(self, device: str):
        """(CommunicatorSpec, ExpertPlacement), or (None, None) for a single rank."""
        import gptoss
        from parallel import CommunicatorSpec, ExpertPlacement
        from parallel.rebalance import initial_placement

        cfg = self.config
        if cfg.num_ranks == 1:
            return None, None
        model_config = await asyncio.to_thread(gptoss.load_config, cfg.checkpoint)
        if cfg.eplb.enabled:  # every rank holds its R extra slots from the load on
            placement = initial_placement(model_config.num_local_experts, cfg.num_ranks,
                                          cfg.eplb.redundant_experts_per_rank)
        else:
            placement = ExpertPlacement.contiguous(model_config.num_local_experts, cfg.num_ranks)
        backend = cfg.communicator
        if backend == "auto":
            backend = "cupy_nccl" if device == "cuda" else "torch_dist"
        if backend == "cupy_nccl":
            uid = await self._ranks[0].nccl_unique_id.remote()
            return CommunicatorSpec("cupy_nccl", cfg.num_ranks, cfg.collective_timeout_s, cfg.join_timeout_s,
                                    nccl_unique_id=uid), placement
        addr, port = await self._ranks[0].rendezvous_address.remote()
        spec = CommunicatorSpec("torch_dist", cfg.num_ranks, cfg.collective_timeout_s, cfg.join_timeout_s, master_addr=addr,
                                master_port=port, torch_backend="nccl" if device == "cuda" else "gloo")
        return spec, placement

    async def _await_loads(self, loads: list, on_progress, deadline: float) -> None:
        pending = [asyncio.ensure_future(ref) for ref in loads]
        while True:
            done, pending = await asyncio.wait(pending, timeout=_PROGRESS_PERIOD_S)
            for future in done:
                future.result()  # a rank's load error surfaces here
            try:  # a rank stuck in a long call may not answer at once: do not wait on it
                async with asyncio.timeout(_PROGRESS_PERIOD_S):  # not wait_for: see placement.wait_placed
                    progress = await asyncio.gather(*(r.progress.remote() for r in self._ranks))
            except TimeoutError:
                progress = None
            if not pending:  # the last report says every rank is ready
                if on_progress is not None and progress is not None:
                    on_progress(progress)
                return
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
        """Stops every rank and releases the placement group (a start in progress is cancelled); open
        streams end with GroupDrainingError. A failed group stays "failed" (its error kept)."""
        self._num_closing += 1
        try:
            if self._start_task is not None:
                self._start_task.cancel()
            async with self._lifecycle:
                await self._shutdown_locked()
        finally:
            self._num_closing -= 1

    async def _shutdown_locked(self) -> None:
        failed = self.state == "failed"
        self.state = "stopping"
        self._end_streams(GroupDrainingError(f"{self.config.name} was shut down"))
        await self._teardown()
        self.state = "failed" if failed else "stopped"

    async def restart(self, on_progress: Callable[[list[LoadProgress]], None] | None = None) -> None:
        """A new group in place of this one: new actors, new communicator, same config."""
        async with self._lifecycle:
            await self._shutdown_locked()
            self.state = "stopped"
            await self._start_locked(on_progress)

    async def drain(self, timeout_s: float) -> None:
        """Stops admitting, lets open requests finish for up to `timeout_s`, aborts the rest, shuts
        down. A group still starting is simply shut down (it holds no requests)."""
        if self._start_task is not None:
            self._start_task.cancel()
        async with self._lifecycle:
            if self.state == "healthy":
                self.state = "draining"
            deadline = time.monotonic() + timeout_s
            try:
                while (self._streams and self.state == "draining" and not self._num_closing
                       and time.monotonic() < deadline):
                    await asyncio.sleep(_DRAIN_POLL_S)
                for request_id in list(self._open_ids):
                    await self.abort(request_id)
                settle = time.monotonic() + 1.0  # let the aborted streams get their last output
                while self._streams and time.monotonic() < settle:
                    await asyncio.sleep(_DRAIN_POLL_S)
            finally:
                await self._shutdown_locked()

    async def _teardown(self) -> None:
        # Everything this teardown owns is taken before the first await: a shielded teardown that
        # outlives a cancelled start must not release what a newer start has reserved meanwhile.
        tasks, self._tasks = self._tasks, []
        ranks, self._ranks = self._ranks, []
        reservation, self._reservation = self._reservation, None
        for task in tasks:
            task.cancel()
        if ranks:
            # Ask the loops to stop together (clean communicator close), then make sure.
            stops = [asyncio.ensure_future(r.stop.remote()) for r in ranks]
            await asyncio.wait(stops, timeout=_STOP_TIMEOUT_S)
            for r in ranks:
                ray.kill(r, no_restart=True)
        if reservation is not None:
            reservation.release()

    # --- requests --------------------------------------------------------------------------------

    async def generate(self, request_id: str, prompt_token_ids: Sequence[int],
                       sampling: SamplingParams | None = None, cache_salt: str = "",
                       resumed_token_ids: Sequence[int] = (),
                       forward: Callable[[RequestOutput], None] | None = None) -> AsyncIterator[RequestOutput]:
        """Streams the request's outputs as they are sampled; the last one has the finish reason.
        With `forward`, every output but the last is handed to it instead, on this event loop as soon as
        it arrives, and only the last is yielded: a caller that passes outputs on (the model server onto
        its token channel) saves a task step per output. An exception `forward` raises is raised here.

        Leaving the loop early (or the caller going away) aborts the request. `cache_salt` (the
        tenant) keeps its prefix-cache blocks and its rank affinity apart from other salts'.
        `resumed_token_ids`: what another group generated before the request moved here (its outputs
        go on from there; Engine.add_request).
        Raises:
            InvalidRequestError: the engine rejected the request (names the field).
            GroupFailedError: the group lost a rank while the request ran, or is failed.
            SuspectRequestError: the group failed in a step of this request (it may be the cause).
            GroupDrainingError: the group is starting, draining or stopped.
        """
        self._check_admitting()
        if request_id in self._open_ids:
            raise InvalidRequestError("request_id", f"request_id must be unique among running requests, "
                                                    f"got {request_id!r} twice")
        # The ranks see a per-call id, so a retried request id never receives a predecessor's late outputs.
        engine_id = f"{request_id}#{next(self._call_ids)}"
        tokens = [*prompt_token_ids, *resumed_token_ids]
        rank = self._pick_rank(prefix_routing_keys(tokens, self.config.engine.block_size, cache_salt))
        generation = self._generation
        stream = self._streams[engine_id] = _Stream(rank, generation, request_id, forward=forward)
        self._open_ids[request_id] = engine_id
        self._num_open_per_rank[rank] += 1
        try:
            try:
                await self._rank_requests[rank].add(RankRequest(
                    engine_id, list(prompt_token_ids), sampling or SamplingParams(), cache_salt,
                    list(resumed_token_ids)))
            except ray.exceptions.RayError as e:
                self._fail(f"rank {rank} unreachable: {e}")
            while True:
                item = await stream.queue.get()
                if isinstance(item, Exception):
                    raise item
                if item.finished:
                    stream.finished = True
                yield item.renamed(request_id)
                if stream.finished:
                    return
        finally:
            if generation == self._generation:  # not a leftover of a group since restarted
                self._streams.pop(engine_id, None)
                self._open_ids.pop(request_id, None)
                self._num_open_per_rank[rank] -= 1
                if not stream.finished and self.state in ("healthy", "draining"):
                    submit_outside_current_task(self._ranks[rank].abort.remote, engine_id)

    async def abort(self, request_id: str) -> bool:
        """Ends the request: its stream gets a last output with finish_reason "abort". Returns False
        when no such request is open."""
        engine_id = self._open_ids.get(request_id)
        stream = self._streams.get(engine_id) if engine_id is not None else None
        if stream is None or stream.generation != self._generation or stream.finished:
            return False
        try:
            await self._ranks[stream.rank].abort.remote(engine_id)
        except ray.exceptions.RayError as e:
            self._fail(f"rank {stream.rank} unreachable: {e}")
        return True

    def _check_admitting(self) -> None:
        if self.state == "failed":
            raise GroupFailedError(f"{self.config.name} has failed ({self.error}); restart it")
        if self.state != "healthy":
            raise GroupDrainingError(f"{self.config.name} is {self.state} and admits no requests")

    def _pick_rank(self, prefix_keys: tuple[bytes, ...]) -> int:
        """The rank that served this prompt's longest prefix before (its blocks are cached there),
        unless it has `affinity_max_extra_requests` more open requests than the least busy rank; else
        the least busy: fewest open requests (counted here, so exact at once), then the most free KV
        blocks, then the fewest waiting, as the ranks last reported."""
        def busyness(rank: int) -> tuple:
            report = self._busyness[rank]
            return self._num_open_per_rank[rank], -report.num_kv_blocks_free, report.num_waiting, rank

        least = min(range(len(self._ranks)), key=busyness)
        affine, _ = self._affinity.lookup(prefix_keys)
        rank = least
        if affine is not None and (self._num_open_per_rank[affine] - self._num_open_per_rank[least]
                                   <= self.config.affinity_max_extra_requests):
            rank = affine
        self._affinity.record(prefix_keys, rank)
        return rank

    async def _pump(self, rank: int, handle) -> None:
        try:
            await self._heartbeat(rank, handle)  # the first transport figure
            async for batch_ref in handle.stream_outputs.remote():
                batch = await batch_ref
                now = time.monotonic()
                for item in batch.items:
                    if isinstance(item, RankOutput):
                        delivery_s = token_delivery_s(item.sampled_at_s, batch.sent_at_s, self._one_way_s[rank])
                        self._deliver(item, delivery_s, now)
                    elif isinstance(item, RequestRejected):
                        stream = self._streams.get(item.request_id)
                        if stream is not None:
                            stream.finished = True  # nothing to abort
                            stream.queue.put_nowait(InvalidRequestError(item.param, item.message))
                    elif isinstance(item, RankBusyness):
                        self._busyness[rank] = item
                    elif isinstance(item, RankFailure):
                        self._fail(f"rank {item.rank} failed: {item.message}", item.suspect_request_ids)
                        return
            self._fail(f"rank {rank} ended its output stream")  # only a shutdown ends it
        except asyncio.CancelledError:
            raise
        except ray.exceptions.RayError as e:
            self._fail(f"rank {rank} died: {type(e).__name__}")
        except Exception as e:  # a bug here must not leave streams waiting for ever
            logger.exception("%s: output pump of rank %d failed", self.config.name, rank)
            self._fail(f"rank {rank} output pump failed: {e!r}")

    def _deliver(self, item: RankOutput, delivery_s: float, now: float) -> None:
        output = item.output
        self._delivery_ms.add(delivery_s * 1000)
        self._token_rate.add(now, len(output.new_token_ids))
        stream = self._streams.get(output.request_id)
        if stream is None:
            return
        if stream.forward is None or output.finished:
            stream.queue.put_nowait(output)
            return
        try:
            stream.forward(output.renamed(stream.request_id))
        except Exception as e:  # noqa: BLE001 - generate raises it; nothing more is forwarded
            stream.forward = None
            stream.queue.put_nowait(e)

    async def _watch_steps(self) -> None:
        """Fails the group when a rank is stuck while requests are open: inside one step for longer
        than `step_timeout_s`, or not answering its heartbeat that long (a frozen process). With G=1
        no collective would ever time out, so without this every stream would hang."""
        cfg = self.config
        period_s = min(_HEARTBEAT_PERIOD_S, cfg.step_timeout_s / 4)
        while True:
            await asyncio.sleep(period_s)
            if not self._streams:
                continue
            beats = [asyncio.ensure_future(self._heartbeat(rank, r)) for rank, r in enumerate(self._ranks)]
            _, pending = await asyncio.wait(beats, timeout=cfg.step_timeout_s)
            if pending:
                for future in pending:
                    future.cancel()
                silent = [rank for rank, future in enumerate(beats) if future in pending]
                self._fail(f"ranks {silent} did not answer a heartbeat within step_timeout_s="
                           f"{cfg.step_timeout_s:g} s while requests were open (stuck or frozen)")
                return
            try:
                stuck = [b for b in (future.result() for future in beats) if b.busy_s > cfg.step_timeout_s]
            except ray.exceptions.RayError as e:
                self._fail(f"a rank died: {type(e).__name__}")
                return
            if stuck:
                self._fail(f"rank {stuck[0].rank} has been in one step for {stuck[0].busy_s:.0f} s, "
                           f"past step_timeout_s={cfg.step_timeout_s:g} s (stuck)")
                return

    async def _heartbeat(self, rank: int, handle) -> RankHeartbeat:
        """The rank's heartbeat; its round trip updates the rank's transport figure."""
        asked = time.monotonic()
        beat = await handle.heartbeat.remote()
        self._one_way_s[rank] = one_way_s(asked, time.monotonic())
        return beat

    def _fail(self, reason: str, suspect_request_ids: Sequence[str] = ()) -> None:
        """Fails the group: every open stream ends with GroupFailedError, except the requests of the step
        that raised (`suspect_request_ids`, engine ids), which end with SuspectRequestError."""
        if self.state in ("failed", "stopping", "stopped"):  # a shutdown's own kills are no failure
            return
        self.state, self.error = "failed", reason
        logger.error("%s failed: %s", self.config.name, reason)
        failed = GroupFailedError(f"{self.config.name} failed: {reason}")
        suspect = SuspectRequestError(f"{self.config.name} failed in a step this request was part of: {reason}")
        for engine_id, stream in self._streams.items():
            stream.queue.put_nowait(suspect if engine_id in suspect_request_ids else failed)

    def _end_streams(self, error: Exception) -> None:
        for stream in self._streams.values():
            stream.queue.put_nowait(error)

    # --- observability ---------------------------------------------------------------------------

    def health(self) -> GroupHealth:
        return GroupHealth(self.state, self.config.num_ranks, self.error)

    async def stats(self) -> GroupStats:
        """Figures of the group and of each rank that answers; answers in every state (while
        starting or stopped, with no ranks)."""
        ranks: tuple[RankStats, ...] = ()
        if self.state in ("healthy", "draining", "failed") and self._ranks:
            asked = [asyncio.ensure_future(r.stats.remote()) for r in self._ranks]
            done, pending = await asyncio.wait(asked, timeout=_STATS_TIMEOUT_S)
            for future in pending:
                future.cancel()
            ranks = tuple(f.result() for f in asked if f in done and f.exception() is None)
        counts = [list(row) for row in ranks[0].expert_token_counts] if ranks else []
        for r in ranks[1:]:
            for layer, row in enumerate(r.expert_token_counts):
                counts[layer] = [a + b for a, b in zip(counts[layer], row, strict=True)]
        reservation = self._reservation
        eplb = _slowest_rank_eplb([r.eplb for r in ranks if r.eplb is not None])
        return GroupStats(
            name=self.config.name,
            state=self.state,
            ranks=ranks,
            num_running=sum(r.engine.num_running for r in ranks),
            num_waiting=sum(r.engine.num_waiting for r in ranks),
            num_kv_blocks_used=sum(r.engine.num_kv_blocks_used for r in ranks),
            num_kv_blocks_free=sum(r.engine.num_kv_blocks_free for r in ranks),
            num_open_streams=len(self._streams),
            output_tokens_per_s=self._token_rate.rate(time.monotonic()),
            token_delivery_p50_ms=self._delivery_ms.get(0.5),
            token_delivery_p99_ms=self._delivery_ms.get(0.99),
            expert_token_counts=tuple(tuple(row) for row in counts),
            placement_group_id=reservation.placement_group.id.hex() if reservation is not None else "",
            eplb=eplb,
        )

    async def rebalance_experts(self) -> Rearrangement:
        """Rearranges the group's experts now, between two steps, from the routed-token counts of the
        last eplb.window_steps (open requests pause, none fails). Returns the plan's figures, with the
        slowest rank's pause.
        Raises:
            ValueError: eplb is off for this group.
            GroupDrainingError / GroupFailedError: the group is not serving.
        """
        if not self.config.eplb.enabled:
            raise ValueError(f"{self.config.name}: expert load balancing is off (set eplb.enabled)")
        self._check_admitting()
        try:
            ask = next(self._rebalance_asks)
            results = await asyncio.gather(*(r.rebalance_experts.remote(ask) for r in self._ranks))
        except ray.exceptions.RayError as e:
            raise GroupFailedError(f"{self.config.name}: rearranging the experts failed: {e}") from e
        return dataclasses.replace(results[0], pause_s=max(r.pause_s for r in results),
                                   fetch_s=max(r.fetch_s for r in results))


def _slowest_rank_eplb(per_rank: list[EplbStats]) -> EplbStats | None:
    """The group's EPLB figures: the plan is the same on every rank, a pause is the slowest rank's."""
    if not per_rank:
        return None
    last = per_rank[0].last
    if last is not None:
        last = dataclasses.replace(last, pause_s=max(s.last.pause_s for s in per_rank if s.last is not None))
    return dataclasses.replace(per_rank[0], pause_s_total=max(s.pause_s_total for s in per_rank), last=last)
