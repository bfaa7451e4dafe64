"""One rank of an EP group: a Ray actor hosting an engine and running the lockstep loop.

Threads: the actor's asyncio loop answers calls (requests in, outputs out, stats); one engine thread owns
the engine and the communicator and runs the lockstep loop. They meet in two places only: a queue of
commands (add / abort) the engine thread drains at the top of each iteration, and an output buffer the
engine thread fills and `stream_outputs` (the group's one streaming generator per rank) empties.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import socket
import sys
import threading
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import torch

from cluster.config import GroupConfig
from cluster.errors import GroupFailedError
from cluster.telemetry import RateWindow
from engine.outputs import EngineStats, RequestOutput
from engine.sampling_params import SamplingParams
from gptoss.errors import InvalidRequestError
from parallel.comm import CommunicatorError
from parallel.rebalance import Rearrangement

logger = logging.getLogger(__name__)

# An idle group re-agrees whether anyone has work with a backoff up to this; a new request wakes
# every rank at once (`wake`), so the backoff costs no latency, only idle CPU when it is short.
_MAX_IDLE_WAIT_S = 0.2
_STATS_PERIOD_S = 0.1
_GIL_SWITCH_INTERVAL_S = 0.0005
_SNAPSHOT_WAIT_S = 1.0  # how stale `stats` may be; the engine thread takes the snapshots
# Aborts that arrived before their request (Ray does not order the calls of an async actor) are kept
# to cancel the request when it comes; ids are per call, so an old entry never hits a new request.
_MAX_EARLY_ABORTS = 4096


@dataclass(frozen=True)
class RankOutput:
    """A request's news from one step, as it leaves the rank."""

    output: RequestOutput
    rank: int
    sampled_at_s: float  # the rank's time.monotonic() when the step that sampled it ended


@dataclass(frozen=True)
class OutputBatch:
    """What `stream_outputs` yields each time the engine thread has produced something. Delivery
    latency is measured in durations on one clock each (a token's age on the rank when sent; half a
    heartbeat's round trip on the group's), never by comparing the clocks of two machines:
    `cluster.telemetry.token_delivery_s`."""

    items: list  # RankOutput, RequestRejected, RankBusyness, RankFailure
    sent_at_s: float  # the rank's time.monotonic() when the batch left


@dataclass(frozen=True)
class RankFailure:
    """Sent instead of outputs once the rank has failed: every request it held is lost."""

    rank: int
    message: str
    # When the error came out of the engine's own computation (not a collective): the engine ids of the
    # step's requests that may have caused it (Engine.suspect_request_ids).
    suspect_request_ids: tuple[str, ...] = ()


@dataclass(frozen=True)
class RequestRejected:
    """add_request refused the request: a client error naming the parameter."""

    request_id: str
    param: str
    message: str


@dataclass(frozen=True)
class RankBusyness:
    """How busy the rank is, sent along with outputs when it changes, for picking ranks."""

    rank: int
    num_running: int
    num_waiting: int
    num_kv_blocks_free: int


@dataclass(frozen=True)
class LoadProgress:
    rank: int
    stage: str  # "waiting", "joining communicator", "loading weights", "ready", "failed"
    tensors_done: int
    tensors_total: int
    error: str = ""


@dataclass(frozen=True)
class RankHeartbeat:
    """Answered by the actor's event loop even while the engine thread is inside a step."""

    rank: int
    busy_s: float  # how long the engine thread has been in its current iteration (0 when idle)
    num_steps: int


@dataclass(frozen=True)
class RankStats:
    """A rank's figures; engine figures are a snapshot at most ~0.1 s old (taken by the engine thread)."""

    rank: int
    node_id: str  # Ray node id of the rank's process
    pid: int
    expert_ids: tuple[int, ...]  # global ids of the experts this rank holds in layer 0
    engine: EngineStats
    expert_token_counts: tuple[tuple[int, ...], ...]  # [layers][experts] tokens routed from this rank
    num_steps: int
    num_empty_steps: int  # steps taken with no work of its own, to keep the group in lockstep
    num_output_tokens: int  # sampled on this rank since start
    output_tokens_per_s: float  # over the last few seconds
    loop_alive: bool
    kernels: tuple[tuple[str, str], ...] = ()  # CPU kernel -> how it runs (engine.kernels); empty on GPU
    layer_expert_ids: tuple[tuple[int, ...], ...] = ()  # per layer: the experts held (EPLB moves them)
    eplb: EplbStats | None = None  # None: expert load balancing is off


@dataclass(frozen=True)
class EplbStats:
    """A rank's expert load balancing so far (parallel/rebalance.py)."""

    num_rearrangements: int  # rearrangements that ran (also those that moved no layer)
    num_layers_moved: int  # layers moved, over all of them
    pause_s_total: float
    last: Rearrangement | None  # the latest, with its per-layer imbalance before and after


@dataclass(frozen=True)
class RankRequest:
    """A request for a rank's engine (`add_requests`); `resumed_token_ids`: outputs generated elsewhere
    before the request moved here (Engine.add_request)."""

    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    cache_salt: str = ""
    resumed_token_ids: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class _Abort:
    request_id: str


@dataclass(frozen=True)
class _Rebalance:
    ask: int  # the group's number for the admin call: every rank gets its own copy of the same number
    done: asyncio.Future  # gets the Rearrangement (or the error) on the actor's event loop


class RankActor:
    """Wrapped with `ray.remote` by the group; every method is called through Ray."""

    def __init__(self, rank: int, config: GroupConfig):
        self.rank, self.config = rank, config
        # The engine thread holds the GIL through the Python parts of a step; a shorter switch interval
        # (default 5 ms) lets the event loop thread hand out a step's outputs without waiting that long.
        # It is process-wide, which is right here: this worker process hosts this one rank actor.
        sys.setswitchinterval(_GIL_SWITCH_INTERVAL_S)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.engine = None
        self.communicator = None
        self.expert_token_counts = None  # parallel.ExpertTokenCounts the model's layers count into
        self.expert_ids: tuple[int, ...] = ()
        self.kernels: tuple[tuple[str, str], ...] = ()
        self._progress = LoadProgress(rank, "waiting", 0, 0)
        self._commands: deque[RankRequest | _Abort | _Rebalance] = deque()
        self.rebalancer = None  # parallel.rebalance.ExpertRebalancer when eplb is on
        self._window_counts = None  # parallel.rebalance.WindowCounts
        self._rebalance_waiters: list[_Rebalance] = []  # engine thread only
        self._asks_served = 0  # every admin call numbered up to this one has had its rearrangement
        self._last_rearrangement: Rearrangement | None = None
        self._eplb_stats: EplbStats | None = None
        self._last_rebalance_step = 0
        self._early_aborts: OrderedDict[str, None] = OrderedDict()  # engine thread only
        self._wake = threading.Event()
        self._begin = threading.Event()
        self._stop = False
        self._failed: str | None = None
        self._thread: threading.Thread | None = None
        self._num_steps = self._num_empty_steps = 0
        self._busy_since: float | None = None  # monotonic start of the engine thread's current iteration
        self._loop: asyncio.AbstractEventLoop | None = None
        self._outputs: list = []
        self._outputs_ready: asyncio.Event | None = None
        self._stats: RankStats | None = None  # snapshot by the engine thread, which owns the engine
        self._engine_stats_at = 0.0
        self._last_busyness: RankBusyness | None = None
        self._snapshot_waiters: deque[asyncio.Future] = deque()  # stats() calls awaiting a fresh snapshot
        self._num_output_tokens = 0
        self._token_rate = RateWindow()

    # --- start-up ----------------------------------------------------------------------------------

    def ready(self) -> str:
        """Answers once the actor runs (the group waits for every rank before any joins the
        communicator: a cold node may take minutes to start its actor). Returns "cuda" when this
        process sees a GPU, else "cpu" (e.g. the fake GPUs of a simulated cluster)."""
        return self.device.type

    def rendezvous_address(self) -> tuple[str, int]:
        """Rank 0, torch_dist: this node's address and a free port for the TCP store."""
        import ray

        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return ray.util.get_node_ip_address(), port

    def nccl_unique_id(self) -> bytes:
        """Rank 0, cupy_nccl: made in this process, which NCCL's bootstrap root then listens in."""
        from parallel import make_nccl_unique_id

        return make_nccl_unique_id()

    async def load(self, communicator_spec, placement) -> str:
        """Joins the communicator, loads this rank's experts and the replicated weights, builds the
        engine, then runs the lockstep loop, all in the engine thread (so `progress` answers meanwhile).
        Returns the device used once loaded."""
        self._loop = asyncio.get_running_loop()
        self._outputs_ready = asyncio.Event()
        loaded = self._loop.create_future()
        self._thread = threading.Thread(target=self._engine_thread, args=(communicator_spec, placement, loaded),
                                        name=f"rank{self.rank}-engine", daemon=True)
        self._thread.start()
        await loaded
        return str(self.device)

    def _engine_thread(self, communicator_spec, placement, loaded: asyncio.Future) -> None:
        # All torch work of this process happens in this one thread: torch ops in a second thread start
        # a second OpenMP pool, and libgomp then throttles the spin-wait of every pool (more threads than
        # cores), which made steps ~25% slower on a 2-core machine. The thread count is per thread too.
        torch.set_num_threads(max(1, int(self.config.num_cpus_per_rank)))
        try:
            self._load(communicator_spec, placement)
        except Exception as e:
            self._progress = LoadProgress(self.rank, "failed", 0, 0, f"{type(e).__name__}: {e}")
            self._loop.call_soon_threadsafe(loaded.set_exception, e)
            return
        self._loop.call_soon_threadsafe(loaded.set_result, None)
        # Every rank enters the lockstep loop only once the whole group has loaded: a fast rank would
        # otherwise wait in its first collective for a slow loader and time out.
        self._begin.wait()
        if not self._stop:
            self._run_loop()
        elif self.communicator is not None:
            self.communicator.close()

    def _load(self, communicator_spec, placement) -> None:
        import gptoss
        from engine.engine import Engine
        from parallel import apply_expert_parallel, count_expert_tokens, create_communicator

        if communicator_spec is not None:
            self._progress = LoadProgress(self.rank, "joining communicator", 0, 0)
            self.communicator = create_communicator(communicator_spec, self.rank, self.device)
        experts = list(placement.expert_ids(self.rank)) if placement is not None else None

        def on_progress(done: int, total: int) -> None:
            self._progress = LoadProgress(self.rank, "loading weights", done, total)

        copies = gptoss.unembedding_copy_bytes(gptoss.load_config(self.config.checkpoint), self.config.torch_dtype,
                                               self.device, self.config.engine.greedy_screen)
        model = gptoss.load_model(self.config.checkpoint, dtype=self.config.torch_dtype, device=self.device,
                                  experts=experts, packed_experts=self.config.packed_experts, progress=on_progress,
                                  reserve_bytes=copies)
        self.expert_ids = tuple(experts if experts is not None else range(model.config.num_local_experts))
        if self.communicator is not None:
            self.expert_token_counts = apply_expert_parallel(model, self.communicator, placement)
            if self.config.eplb.enabled:
                self._start_rebalancer(model, placement)
        else:  # one rank: no dispatcher counts the routed tokens, hooks on the routers do
            self.expert_token_counts = count_expert_tokens(model)
        if self.device.type == "cpu":  # loaded now, not inside the first request
            from engine.kernels import prepare_cpu_kernels

            self.kernels = tuple(prepare_cpu_kernels(self.config.engine.greedy_screen).items())
            if self.rank == 0:
                logger.info("CPU kernels: %s", "; ".join(f"{name}: {how}" for name, how in self.kernels))
        self.engine = Engine(model, self.config.engine)
        self._snapshot_stats()
        done = self._progress.tensors_total
        self._progress = LoadProgress(self.rank, "ready", done, done)

    def _start_rebalancer(self, model, placement) -> None:
        import ray

        from gptoss.checkpoint import CheckpointReader, detect_layout
        from gptoss.errors import InsufficientMemoryError
        from gptoss.load import read_experts
        from gptoss.memory import available_bytes, gib
        from parallel.rebalance import ExpertRebalancer, WindowCounts

        eplb = self.config.eplb
        reader = CheckpointReader(detect_layout(self.config.checkpoint))
        packed = model.layers[0].mlp.experts.packed

        def read(layer: int, expert_ids: list[int]):
            return read_experts(reader, layer, expert_ids, packed, self.config.torch_dtype, self.device)

        node_key = int(ray.get_runtime_context().get_node_id()[:15], 16)
        self.rebalancer = ExpertRebalancer(model, self.communicator, [placement] * model.config.num_hidden_layers,
                                           redundant_per_rank=eplb.redundant_experts_per_rank, read_experts=read,
                                           transfer=eplb.transfer, node_key=node_key, min_gain=eplb.min_gain)
        self._window_counts = WindowCounts(self.expert_token_counts, eplb.window_steps)
        self._eplb_stats = EplbStats(0, 0, 0.0, None)
        need, free = self.rebalancer.transient_bytes(), available_bytes(self.device)
        if free is not None and need > free:
            raise InsufficientMemoryError(
                f"rank {self.rank}: expert load balancing needs ~{gib(need)} free beyond the model (one layer's "
                f"experts, held twice where a move changes a rank's count of experts) but {gib(free)} is free on "
                f"{self.device}; set eplb.enabled false or fewer eplb.redundant_experts_per_rank")

    def begin(self) -> None:
        """Starts the lockstep loop; the group calls it on every rank once all have loaded."""
        self._begin.set()

    def progress(self) -> LoadProgress:
        return self._progress

    # --- requests ----------------------------------------------------------------------------------

    def add_requests(self, requests: list[RankRequest]) -> None:
        """Queues requests for the engine thread; a rejection comes back through `stream_outputs`. One
        call carries every request its group had for this rank while the previous call was under way."""
        if self._failed:
            raise GroupFailedError(f"rank {self.rank} has failed: {self._failed}")
        self._commands.extend(requests)
        self._wake.set()

    def abort(self, request_id: str) -> None:
        """Ends the request (its last output has finish_reason "abort"), also when this call overtakes
        its `add_requests`."""
        self._commands.append(_Abort(request_id))
        self._wake.set()

    async def rebalance_experts(self, ask: int):
        """Asks the group for a rearrangement of its experts between two steps (any rank's ask, or the
        interval, starts one on all ranks together); returns this rank's Rearrangement once done. `ask`
        numbers the group's admin call (increasing; every rank gets the same number): one rearrangement
        answers every rank's copy, also a copy that reaches its rank only after the others started it.
        Raises ValueError when eplb is off."""
        if self.rebalancer is None:
            raise ValueError(f"{self.config.name}: expert load balancing is off (set eplb.enabled)")
        if self._failed:
            raise GroupFailedError(f"rank {self.rank} has failed: {self._failed}")
        done = self._loop.create_future()
        self._commands.append(_Rebalance(ask, done))
        self._wake.set()
        return await done

    def wake(self) -> None:
        """Ends an idle wait now: a request is about to arrive somewhere in the group."""
        self._wake.set()

    async def stream_outputs(self) -> AsyncIterator[OutputBatch]:
        """Everything the engine thread produced since the last batch, each time it has produced
        something, for as long as the rank lives: the group iterates it as a Ray streaming generator.
        A long poll cost an actor call per step, ~0.4-1 ms of CPU in the rank and as much in the model
        server on a 2-core VM, and the rank's share is GIL time its engine thread waits for."""
        while True:
            while not self._outputs:
                self._outputs_ready.clear()
                await self._outputs_ready.wait()
            outputs, self._outputs = self._outputs, []
            yield OutputBatch(outputs, time.monotonic())

    async def heartbeat(self) -> RankHeartbeat:
        busy_since = self._busy_since
        return RankHeartbeat(self.rank, time.monotonic() - busy_since if busy_since is not None else 0.0,
                             self._num_steps)

    async def stats(self) -> RankStats:
        """A fresh snapshot, taken by the engine thread (torch work stays in that thread) at its next
        iteration; the latest one if the loop does not answer within a second."""
        alive = self._thread is not None and self._thread.is_alive()
        if alive and self._loop is not None:
            taken = self._loop.create_future()
            self._snapshot_waiters.append(taken)
            self._wake.set()
            try:
                await asyncio.wait_for(taken, timeout=_SNAPSHOT_WAIT_S)
            except TimeoutError:
                pass
        return dataclasses.replace(self._stats, loop_alive=alive)

    async def stop(self, timeout_s: float = 5.0) -> None:
        """Ends the loop on every rank together (the stop is agreed like the step decision) and waits
        up to `timeout_s` for this rank's loop to close its communicator."""
        self._stop = True
        self._wake.set()
        self._begin.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, timeout_s)

    # --- the engine thread -------------------------------------------------------------------------

    def _publish(self, items: list) -> None:
        def put() -> None:
            self._outputs.extend(items)
            self._outputs_ready.set()

        self._loop.call_soon_threadsafe(put)

    def _apply_commands(self) -> list:
        """Adds and aborts what arrived since the last iteration; returns what to publish at once."""
        news = []
        while self._commands:
            command = self._commands.popleft()
            if isinstance(command, _Abort):
                if not self.engine.abort(command.request_id):
                    self._remember_early_abort(command.request_id)
                continue
            if isinstance(command, _Rebalance):
                if command.ask <= self._asks_served:  # the other ranks' copies already started it
                    self._loop.call_soon_threadsafe(lambda f=command.done, r=self._last_rearrangement:
                                                    f.done() or f.set_result(r))
                else:
                    self._rebalance_waiters.append(command)
                continue
            if command.request_id in self._early_aborts:  # aborted before it arrived
                del self._early_aborts[command.request_id]
                news.append(RankOutput(RequestOutput(command.request_id, (), None, "abort",
                                                     len(command.prompt_token_ids), 0, 0), self.rank, time.monotonic()))
                continue
            try:
                self.engine.add_request(command.request_id, command.prompt_token_ids, command.sampling,
                                        command.cache_salt, command.resumed_token_ids)
            except InvalidRequestError as e:
                news.append(RequestRejected(command.request_id, e.param, str(e)))
        return news

    def _remember_early_abort(self, request_id: str) -> None:
        # Also reached by aborts of requests that already finished: the cap bounds what they keep.
        self._early_aborts[request_id] = None
        if len(self._early_aborts) > _MAX_EARLY_ABORTS:
            self._early_aborts.popitem(last=False)

    def _agree(self, has_work: bool) -> tuple[bool, bool, int | None]:
        """(anyone has work, anyone is stopping, the admin call to rearrange the experts for now, 0 for
        the interval's rearrangement, None for none): one small all-reduce per iteration on every rank."""
        if self.communicator is None:
            return has_work, self._stop, None
        due, ask = self._wants_rebalance()
        anyone_work, anyone_stop, anyone_due, newest_ask = self.communicator.all_reduce_ints(
            [int(has_work), int(self._stop), int(due), ask], "max")
        # Every rank computes the same answer: _asks_served moves only with agreed values.
        rebalance = newest_ask if newest_ask > self._asks_served else (0 if anyone_due else None)
        return bool(anyone_work), bool(anyone_stop), rebalance

    def _wants_rebalance(self) -> tuple[bool, int]:
        """(the interval is due, the newest admin call waiting here or 0)."""
        if self.rebalancer is None:
            return False, 0
        interval = self.config.eplb.interval_steps
        due = interval > 0 and self._num_steps - self._last_rebalance_step >= interval
        return due, max((w.ask for w in self._rebalance_waiters), default=0)

    def _rebalance(self, ask: int) -> None:
        """Every rank at once, between two steps (the engine's requests wait; none is lost), for the
        admin calls numbered up to `ask` (0: the interval's)."""
        self._last_rebalance_step = self._num_steps
        try:
            result = self.rebalancer.rearrange(self._window_counts.window())
        except Exception as e:  # the communicator broke: the group is done (the loop's handler)
            waiters, self._rebalance_waiters = self._rebalance_waiters, []
            for waiter in waiters:
                self._loop.call_soon_threadsafe(lambda f=waiter.done, e=e: f.done() or f.set_exception(e))
            raise
        self._asks_served = max(self._asks_served, ask)
        self._last_rearrangement = result
        waiters = [w.done for w in self._rebalance_waiters if w.ask <= self._asks_served]
        self._rebalance_waiters = [w for w in self._rebalance_waiters if w.ask > self._asks_served]
        before = self._eplb_stats
        self._eplb_stats = EplbStats(before.num_rearrangements + 1, before.num_layers_moved + len(result.changed_layers),
                                     before.pause_s_total + result.pause_s, result)
        for done in waiters:
            self._loop.call_soon_threadsafe(lambda f=done: f.done() or f.set_result(result))

    def _snapshot_stats(self) -> None:
        import ray

        stats = self.engine.get_stats()
        now = self._engine_stats_at = time.monotonic()
        counts = self._stats.expert_token_counts if self._stats is not None else ()
        if self.expert_token_counts is not None and (self._snapshot_waiters or self._stats is None):
            # Only when a caller asks: on a GPU reading the counters syncs the device.
            counts = tuple(tuple(row) for row in self.expert_token_counts.get_counts().tolist())
        node_id = self._stats.node_id if self._stats is not None else ray.get_runtime_context().get_node_id()
        layers = (tuple(tuple(p.expert_ids(self.rank)) for p in self.rebalancer.placements)
                  if self.rebalancer is not None else ())
        self._stats = RankStats(self.rank, node_id, os.getpid(), layers[0] if layers else self.expert_ids, stats,
                                counts, self._num_steps, self._num_empty_steps, self._num_output_tokens,
                                self._token_rate.rate(now), loop_alive=True, kernels=self.kernels,
                                layer_expert_ids=layers, eplb=self._eplb_stats)
        busyness = RankBusyness(self.rank, stats.num_running, stats.num_waiting, stats.num_kv_blocks_free)
        if busyness != self._last_busyness:  # an idle rank sends nothing
            self._last_busyness = busyness
            self._publish([busyness])
        while self._snapshot_waiters:
            taken = self._snapshot_waiters.popleft()
            self._loop.call_soon_threadsafe(lambda f=taken: f.done() or f.set_result(None))

    def _run_loop(self) -> None:
        idle_wait_s = 0.001
        in_step = False
        try:
            while True:
                self._busy_since = time.monotonic()
                if self._snapshot_waiters or self._busy_since - self._engine_stats_at > _STATS_PERIOD_S:
                    self._snapshot_stats()
                news = self._apply_commands()
                if news:
                    self._publish(news)
                has_work = self.engine.has_work()
                anyone_work, stopping, rebalance_ask = self._agree(has_work)
                if stopping:
                    break
                if rebalance_ask is not None:
                    self._rebalance(rebalance_ask)
                if anyone_work:
                    in_step = True
                    outputs = self.engine.step()  # an empty step when only others have work
                    in_step = False
                    self._num_steps += 1
                    self._num_empty_steps += not has_work
                    if self._window_counts is not None:
                        self._window_counts.step_done(self._num_steps)
                    if outputs:
                        num_tokens = sum(len(o.new_token_ids) for o in outputs)
                        self._num_output_tokens += num_tokens
                        now = time.monotonic()
                        self._token_rate.add(now, num_tokens)
                        self._publish([RankOutput(o, self.rank, now) for o in outputs])
                        time.sleep(0)  # hand the GIL to the event loop thread now: it sends the outputs
                    idle_wait_s = 0.001
                else:
                    self._busy_since = None
                    woken = self._wake.wait(idle_wait_s)
                    self._wake.clear()
                    idle_wait_s = 0.001 if woken else min(idle_wait_s * 2, _MAX_IDLE_WAIT_S)
        except Exception as e:  # a collective timed out, a peer died, or the engine broke: the group is done
            self._failed = f"{type(e).__name__}: {e}"
            logger.error("rank %d failed: %s", self.rank, self._failed, exc_info=e)
            # A collective's failure is the group's; an error of the step's own computation may be a
            # request's: name the suspects so that none of them is sent on to fail another group.
            suspects = () if isinstance(e, CommunicatorError) or not in_step else self.engine.suspect_request_ids()
            self._publish([RankFailure(self.rank, self._failed, suspects)])
        finally:
            self._busy_since = None
            if self.communicator is not None:
                self.communicator.close()
