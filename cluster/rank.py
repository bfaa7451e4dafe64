"""One rank of an EP group: a Ray actor hosting an engine and running the lockstep loop.

Threads: the actor's asyncio loop answers calls (requests in, outputs out, stats); one engine thread owns
the engine and the communicator and runs the lockstep loop. They meet in two places only: a queue of
commands (add / abort) the engine thread drains at the top of each iteration, and an output buffer the
engine thread fills and `take_outputs` (a long poll) empties.
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
from collections import deque
from dataclasses import dataclass

import torch

from cluster.config import GroupConfig
from cluster.errors import GroupFailedError
from engine.outputs import EngineStats, RequestOutput
from engine.sampling_params import SamplingParams
from gptoss.errors import InvalidRequestError

logger = logging.getLogger(__name__)

# An idle group re-agrees whether anyone has work with a backoff up to this; a new request wakes
# every rank at once (`wake`), so the backoff costs no latency, only idle CPU when it is short.
_MAX_IDLE_WAIT_S = 0.2
_STATS_PERIOD_S = 0.1
_GIL_SWITCH_INTERVAL_S = 0.0005
_RATE_WINDOW_S = 10.0
_SNAPSHOT_WAIT_S = 1.0  # how stale `stats` may be; the engine thread takes the snapshots


@dataclass(frozen=True)
class RankOutput:
    """A request's news from one step, as it leaves the rank."""

    output: RequestOutput
    rank: int
    sampled_at_s: float  # time.time() when the step that sampled it ended


@dataclass(frozen=True)
class RankFailure:
    """Sent instead of outputs once the rank has failed: every request it held is lost."""

    rank: int
    message: str


@dataclass(frozen=True)
class RequestRejected:
    """add_request refused the request: a client error naming the parameter."""

    request_id: str
    param: str
    message: str


@dataclass(frozen=True)
class RankLoad:
    """How busy the rank is, sent along with outputs now and then, for picking ranks."""

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
class RankStats:
    """A rank's figures; engine figures are a snapshot at most ~0.1 s old (taken by the engine thread)."""

    rank: int
    engine: EngineStats
    expert_token_counts: tuple[tuple[int, ...], ...]  # [layers][experts] tokens routed from this rank
    num_steps: int
    num_empty_steps: int  # steps taken with no work of its own, to keep the group in lockstep
    num_output_tokens: int  # sampled on this rank since start
    output_tokens_per_s: float  # over the last few seconds
    loop_alive: bool


class RankActor:
    """Wrapped with `ray.remote` by the group; every method is called through Ray."""

    def __init__(self, rank: int, config: GroupConfig):
        self.rank, self.config = rank, config
        # The engine thread holds the GIL through the Python parts of a step; a shorter switch interval
        # (default 5 ms) lets the event loop thread hand out a step's outputs without waiting that long.
        sys.setswitchinterval(_GIL_SWITCH_INTERVAL_S)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.engine = None
        self.communicator = None
        self.expert_load = None
        self._progress = LoadProgress(rank, "waiting", 0, 0)
        self._commands: deque[tuple] = deque()
        self._wake = threading.Event()
        self._begin = threading.Event()
        self._stop = False
        self._failed: str | None = None
        self._thread: threading.Thread | None = None
        self._num_steps = self._num_empty_steps = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._outputs: list = []
        self._outputs_ready: asyncio.Event | None = None
        self._stats: RankStats | None = None  # snapshot by the engine thread, which owns the engine
        self._engine_stats_at = 0.0
        self._last_load: RankLoad | None = None
        self._snapshot_waiters: deque[asyncio.Future] = deque()  # stats() calls awaiting a fresh snapshot
        self._num_output_tokens = 0
        self._token_history: deque[tuple[float, int]] = deque()  # (monotonic time, tokens so far) per snapshot

    # --- start-up ----------------------------------------------------------------------------------

    def rendezvous_address(self) -> tuple[str, int]:
        """Rank 0, torch_dist: this node's address and a free port for the TCP store."""
        import ray

        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return ray.util.get_node_ip_address(), port

    def device_kind(self) -> str:
        """"cuda" when this process sees a GPU, else "cpu" (e.g. fake GPUs of a simulated cluster)."""
        return self.device.type

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
        from parallel import apply_expert_parallel, create_communicator

        if communicator_spec is not None:
            self._progress = LoadProgress(self.rank, "joining communicator", 0, 0)
            self.communicator = create_communicator(communicator_spec, self.rank, self.device)
        experts = list(placement.expert_ids(self.rank)) if placement is not None else None

        def on_progress(done: int, total: int) -> None:
            self._progress = LoadProgress(self.rank, "loading weights", done, total)

        model = gptoss.load_model(self.config.checkpoint, dtype=self.config.torch_dtype, device=self.device,
                                  experts=experts, packed_experts=self.config.packed_experts, progress=on_progress)
        if self.communicator is not None:
            self.expert_load = apply_expert_parallel(model, self.communicator, placement)
        self.engine = Engine(model, self.config.engine)
        self._snapshot_stats()
        done = self._progress.tensors_total
        self._progress = LoadProgress(self.rank, "ready", done, done)

    def begin(self) -> None:
        """Starts the lockstep loop; the group calls it on every rank once all have loaded."""
        self._begin.set()

    def progress(self) -> LoadProgress:
        return self._progress

    # --- requests ----------------------------------------------------------------------------------

    def add_request(self, request_id: str, prompt_token_ids: list[int], sampling: SamplingParams) -> None:
        """Queues a request for the engine thread; a rejection comes back through `take_outputs`."""
        if self._failed:
            raise GroupFailedError(f"rank {self.rank} has failed: {self._failed}")
        self._commands.append(("add", request_id, prompt_token_ids, sampling))
        self._wake.set()

    def abort(self, request_id: str) -> None:
        self._commands.append(("abort", request_id))
        self._wake.set()

    def wake(self) -> None:
        """Ends an idle wait now: a request is about to arrive somewhere in the group."""
        self._wake.set()

    async def take_outputs(self) -> list:
        """Long poll: waits until the engine thread has produced something, returns it all."""
        while not self._outputs:
            self._outputs_ready.clear()
            await self._outputs_ready.wait()
        outputs, self._outputs = self._outputs, []
        return outputs

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

    def held_expert_ids(self) -> list[int]:
        """Global ids of the experts this rank holds (the same in every layer)."""
        return list(self.engine.model.layers[0].mlp.experts.expert_ids)

    def where(self) -> tuple[str, int]:
        """(Ray node id, process id) of this rank."""
        import ray

        return ray.get_runtime_context().get_node_id(), os.getpid()

    # --- the engine thread -------------------------------------------------------------------------

    def _publish(self, items: list) -> None:
        def put() -> None:
            self._outputs.extend(items)
            self._outputs_ready.set()

        self._loop.call_soon_threadsafe(put)

    def _apply_commands(self) -> list:
        rejected = []
        while self._commands:
            command = self._commands.popleft()
            if command[0] == "add":
                _, request_id, prompt, sampling = command
                try:
                    self.engine.add_request(request_id, prompt, sampling)
                except InvalidRequestError as e:
                    rejected.append(RequestRejected(request_id, e.param, str(e)))
            else:
                self.engine.abort(command[1])
        return rejected

    def _agree(self, has_work: bool) -> tuple[bool, bool]:
        """(anyone has work, anyone is stopping): one small all-reduce per iteration on every rank."""
        if self.communicator is None:
            return has_work, self._stop
        anyone_work, anyone_stop = self.communicator.all_reduce_ints([int(has_work), int(self._stop)], "max")
        return bool(anyone_work), bool(anyone_stop)

    def _snapshot_stats(self) -> None:
        stats = self.engine.get_stats()
        now = self._engine_stats_at = time.monotonic()
        history = self._token_history
        history.append((now, self._num_output_tokens))
        while now - history[0][0] > _RATE_WINDOW_S:
            history.popleft()
        span = history[-1][0] - history[0][0]
        rate = (history[-1][1] - history[0][1]) / span if span > 0 else 0.0
        counts = self._stats.expert_token_counts if self._stats is not None else ()
        if self.expert_load is not None and (self._snapshot_waiters or self._stats is None):
            # Only when a caller asks: on a GPU reading the counters syncs the device.
            counts = tuple(tuple(row) for row in self.expert_load.get_counts().tolist())
        self._stats = RankStats(self.rank, stats, counts, self._num_steps, self._num_empty_steps,
                                self._num_output_tokens, rate, loop_alive=True)
        load = RankLoad(self.rank, stats.num_running, stats.num_waiting, stats.num_kv_blocks_free)
        if load != self._last_load:  # an idle rank sends nothing
            self._last_load = load
            self._publish([load])
        while self._snapshot_waiters:
            taken = self._snapshot_waiters.popleft()
            self._loop.call_soon_threadsafe(lambda f=taken: f.done() or f.set_result(None))

    def _run_loop(self) -> None:
        idle_wait_s = 0.001
        try:
            while True:
                if self._snapshot_waiters or time.monotonic() - self._engine_stats_at > _STATS_PERIOD_S:
                    self._snapshot_stats()
                rejected = self._apply_commands()
                if rejected:
                    self._publish(rejected)
                has_work = self.engine.has_work()
                anyone_work, stopping = self._agree(has_work)
                if stopping:
                    break
                if anyone_work:
                    outputs = self.engine.step()  # an empty step when only others have work
                    self._num_steps += 1
                    self._num_empty_steps += not has_work
                    if outputs:
                        self._num_output_tokens += sum(len(o.new_token_ids) for o in outputs)
                        now = time.time()
                        self._publish([RankOutput(o, self.rank, now) for o in outputs])
                        time.sleep(0)  # hand the GIL to the event loop thread now: it sends the outputs
                    idle_wait_s = 0.001
                else:
                    woken = self._wake.wait(idle_wait_s)
                    self._wake.clear()
                    idle_wait_s = 0.001 if woken else min(idle_wait_s * 2, _MAX_IDLE_WAIT_S)
        except Exception as e:  # a collective timed out, a peer died, or the engine broke: the group is done
            self._failed = f"{type(e).__name__}: {e}"
            logger.error("rank %d failed: %s", self.rank, self._failed)
            self._publish([RankFailure(self.rank, self._failed)])
        finally:
            if self.communicator is not None:
                self.communicator.close()
