"""The cupy_nccl backend: NCCL reached through CuPy, on torch's current CUDA stream.

CuPy is imported only when this backend is constructed (or `make_nccl_unique_id` is called): CPU installs
never import it.

The variable all-to-all is one NCCL group: `ncclGroupStart`, one `ncclSend` and one `ncclRecv` per peer
with a non-zero count, `ncclGroupEnd`; the rank's own share is a local device copy. Rows travel as bytes,
so any dtype (bf16 included) goes through unchanged.

Timeouts. CuPy's NCCL wrapper only makes blocking communicators (no `ncclCommInitRankConfig`), so:
- init runs in a helper thread that the constructor waits for up to `join_timeout_s`; then a one-byte
  all-to-all with every peer, an all-gather and a barrier (each within `timeout_s`, like any collective)
  make NCCL set up all its connections before the constructor returns, so later host calls (`ncclGroupEnd`) do not wait on peers: after init a missing peer only
  stalls kernels on the GPU;
- every operation is registered with a watchdog thread before its first NCCL call, with a deadline and a
  CUDA event recorded after it. Past the deadline (or on an asynchronous NCCL error) the watchdog marks the
  communicator failed and calls `ncclCommAbort` once no thread is inside an NCCL call on it (see
  `_abort_if_idle`); the abort ends the stalled kernels, so the stream and any host wait on it move on. The
  next call (every host-blocking one checks right after its wait) raises `CommunicatorTimeout`;
- the send and receive buffers of an operation stay referenced by its watchdog entry until its event has
  completed, whatever the caller does with them.
Every thread that calls NCCL or CUDA here (the caller's, the init helper, the watchdog) first makes the
rank's device current. NCCL cannot tell which peer is missing: the error names the operation and the peers
it waits on.
"""

from __future__ import annotations

import logging
import math
import platform
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from parallel.comm import Communicator, CommunicatorError, CommunicatorTimeout, resolve_cuda_device

logger = logging.getLogger(__name__)

NCCL_UNIQUE_ID_BYTES = 128
# close() waits this long for a thread inside an NCCL call; past it, that thread aborts on its way out.
_CLOSE_LOCK_WAIT_S = 1.0


def make_nccl_unique_id() -> bytes:
    """The bootstrap id of a new NCCL group (128 bytes). Call it on rank 0's process, which must stay alive
    until every rank has joined (NCCL's bootstrap root listens in the calling process)."""
    from cupy.cuda import nccl

    # CuPy hands the id over as C `char`s, signed or not by platform: & 0xFF reads either as bytes.
    return bytes(b & 0xFF for b in nccl.get_unique_id())


def _c_char_is_signed() -> bool:
    # Signed on x86; unsigned on Linux aarch64 (GH200, GB200) and ppc64le, the other CUDA hosts.
    return platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")


def _cupy_unique_id(unique_id: bytes) -> tuple[int, ...]:
    # CuPy's NcclCommunicator copies the tuple into ncclUniqueId's `char internal[128]`, and Cython raises
    # OverflowError for a value outside `char`'s range: -128..127 where it is signed, 0..255 where unsigned.
    if _c_char_is_signed():
        return tuple(b - 256 if b > 127 else b for b in unique_id)
    return tuple(unique_id)


@dataclass(frozen=True)
class PeerTransfer:
    peer: int
    offset_bytes: int
    nbytes: int


@dataclass(frozen=True)
class AllToAllPlan:
    """The NCCL calls of one variable all-to-all: no zero-size transfer, no transfer to self."""

    sends: tuple[PeerTransfer, ...]
    recvs: tuple[PeerTransfer, ...]
    local: tuple[int, int, int] | None  # (send offset rows, recv offset rows, rows) copied on the device

    @property
    def peers(self) -> list[int]:
        return sorted({t.peer for t in (*self.sends, *self.recvs)})


def plan_all_to_all(rank: int, send_counts: Sequence[int], recv_counts: Sequence[int], row_nbytes: int) -> AllToAllPlan:
    """Byte offsets and sizes of each peer's share in the send and receive buffers."""
    sends, recvs = [], []
    send_offset, recv_offset, local = 0, 0, None
    for peer, (n_send, n_recv) in enumerate(zip(send_counts, recv_counts, strict=True)):
        if peer == rank:
            if n_send != n_recv:
                raise ValueError(f"rank {rank} sends itself {n_send} rows but expects {n_recv}")
            if n_send:
                local = (send_offset, recv_offset, n_send)
        else:
            if n_send and row_nbytes:
                sends.append(PeerTransfer(peer, send_offset * row_nbytes, n_send * row_nbytes))
            if n_recv and row_nbytes:
                recvs.append(PeerTransfer(peer, recv_offset * row_nbytes, n_recv * row_nbytes))
        send_offset += n_send
        recv_offset += n_recv
    return AllToAllPlan(tuple(sends), tuple(recvs), local)


class StreamOps(Protocol):
    """What the backend needs from the device: the stream NCCL runs on and events on it."""

    # True: work enqueued later on the stream runs after NCCL's (CUDA). False: the tensors' later users
    # are not stream-ordered (CPU tensors under a fake NCCL), so each all-to-all waits for its data.
    stream_ordered: bool

    def bind_thread(self) -> None: ...  # make the rank's device current in the calling thread

    def stream(self) -> int: ...  # the raw handle of the stream to enqueue on

    def record_event(self) -> Any: ...  # an event with query() -> bool and synchronize()


class TorchCudaStreams:
    """torch's current CUDA stream of `device`."""

    stream_ordered = True

    def __init__(self, device: torch.device):
        self.device = device

    def bind_thread(self) -> None:
        # cudaSetDevice for the calling thread: NCCL, CuPy and torch all take the current device from it.
        torch.cuda.set_device(self.device)

    def stream(self) -> int:
        return torch.cuda.current_stream(self.device).cuda_stream

    def record_event(self) -> torch.cuda.Event:
        # blocking=True: a host wait on it sleeps instead of spinning a core.
        event = torch.cuda.Event(blocking=True)
        event.record(torch.cuda.current_stream(self.device))
        return event


@dataclass
class _Pending:
    op: str
    peers: list[int]
    deadline: float
    event: Any = None  # None while the host is still enqueuing (or, once the communicator failed, for good)
    buffers: tuple = field(default=(), repr=False)


class _Watchdog:
    """Fails the communicator when the oldest pending operation passes its deadline."""

    def __init__(self, comm: CupyNcclCommunicator, poll_s: float):
        self._comm, self._poll_s = comm, poll_s
        self._pending: deque[_Pending] = deque()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"nccl-watchdog-rank{comm.rank}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(max(1.0, 5 * self._poll_s))

    def begin(self, op: str, peers: list[int]) -> _Pending:
        entry = _Pending(op, peers, time.monotonic() + self._comm.timeout_s)
        with self._lock:
            self._pending.append(entry)
        return entry

    def end(self, entry: _Pending, event: Any, buffers: tuple) -> None:
        with self._lock:
            entry.event, entry.buffers = event, buffers

    def has_unfinished(self) -> bool:
        """Whether some operation is still being enqueued or its work has not completed."""
        with self._lock:
            return any(p.event is None or not p.event.query() for p in self._pending)

    def _loop(self) -> None:
        self._comm._streams.bind_thread()
        while not self._stop.wait(self._poll_s):
            self.poll()

    def poll(self) -> None:
        comm = self._comm
        if comm.broken:
            comm._abort_if_idle()  # a failure marked while some thread was inside an NCCL call
            return
        with self._lock:
            # Operations complete in stream order: drop the finished ones from the front.
            while self._pending and self._pending[0].event is not None and self._pending[0].event.query():
                self._pending.popleft()
            head = self._pending[0] if self._pending else None
        if head is not None and time.monotonic() > head.deadline:
            stage = "still being enqueued" if head.event is None else "enqueued"
            comm._fail(CommunicatorTimeout(
                f"rank {comm.rank}: {head.op} did not complete within {comm.timeout_s} s ({stage}); "
                f"it exchanges with ranks {head.peers}, at least one of which never arrived (NCCL cannot tell "
                "which); the communicator was aborted", rank=comm.rank, op=head.op))
            return
        comm._check_async_error()


class CupyNcclCommunicator(Communicator):
    """One rank of an NCCL group, through CuPy.

    Args:
        rank, world_size: this rank and G.
        unique_id: the 128 bytes from `make_nccl_unique_id()` on rank 0's process.
        timeout_s: deadline of every collective, the connection warm-up after init included.
        device: the rank's GPU (default: the current CUDA device).
        stream_ops: where NCCL work is enqueued (default torch's current stream on `device`; tests pass a
            fake together with a fake `cupy.cuda.nccl`).
        join_timeout_s: deadline for every rank to join the NCCL group (None: `timeout_s`).
    Raises:
        CommunicatorTimeout: not every rank joined within `join_timeout_s`, or the warm-up timed out.
    """

    backend = "cupy_nccl"

    def __init__(self, rank: int, world_size: int, unique_id: bytes, timeout_s: float = 60.0,
                 device: str | torch.device | None = None, *, stream_ops: StreamOps | None = None,
                 join_timeout_s: float | None = None):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        if len(unique_id) != NCCL_UNIQUE_ID_BYTES:
            raise ValueError(f"unique_id must be {NCCL_UNIQUE_ID_BYTES} bytes, got {len(unique_id)}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        from cupy.cuda import nccl  # only when this backend is chosen

        self._nccl = nccl
        self.rank, self.world_size, self.timeout_s = rank, world_size, float(timeout_s)
        self.join_timeout_s = float(join_timeout_s or timeout_s)
        if stream_ops is None:
            self.device = resolve_cuda_device(device)
            stream_ops = TorchCudaStreams(self.device)
        else:
            self.device = torch.device(device if device is not None else "cpu")
        self._streams = stream_ops
        self._seq = 0
        self._error: CommunicatorError | None = None  # the first error; set once, under _error_lock
        self._error_lock = threading.Lock()
        # Held by whichever thread is inside an NCCL call on the communicator (enqueue, async error check,
        # abort, destroy): nothing aborts or destroys it under another thread's call.
        self._nccl_lock = threading.Lock()
        self._released = False  # aborted or destroyed (under _nccl_lock): no NCCL call may use it again
        self._comm = self._init_comm(_cupy_unique_id(unique_id))
        self._watchdog = _Watchdog(self, poll_s=min(0.05, self.timeout_s / 20))
        self._watchdog.start()
        # NCCL connects lazily: point-to-point peers at their first send/recv, rings and trees at the first
        # collective (NCCL_RUNTIME_CONNECT, NCCL >= 2.22), each inside a blocking ncclGroupEnd. Make every
        # connection now, inside the init deadline.
        ones = [1] * world_size
        try:
            warm = self.all_to_all(torch.zeros(world_size, dtype=torch.uint8, device=self.device), ones, ones,
                                   label="connection warm-up")
            self._wait(warm, "init (connection warm-up)")
            self.all_gather_ints([rank])
            self.barrier()
        except Exception:
            self.close()
            raise

    def _init_comm(self, unique_id: tuple[int, ...]) -> Any:
        result: dict[str, Any] = {}

        def init() -> None:
            try:
                self._streams.bind_thread()
                result["comm"] = self._nccl.NcclCommunicator(self.world_size, unique_id, self.rank)
            except Exception as e:  # handed to the constructor's thread
                result["error"] = e

        thread = threading.Thread(target=init, name=f"nccl-init-rank{self.rank}", daemon=True)
        thread.start()
        thread.join(self.join_timeout_s)
        if thread.is_alive():
            # The init thread stays blocked in NCCL's bootstrap (nothing can cancel it): this process
            # should be retired with its group.
            raise CommunicatorTimeout(f"rank {self.rank}: the NCCL group of {self.world_size} ranks did not form "
                                      f"within {self.join_timeout_s} s (some rank never joined)", rank=self.rank, op="init")
        if "error" in result:
            raise CommunicatorError(f"rank {self.rank}: NCCL init failed: {result['error']}", rank=self.rank,
                                    op="init") from result["error"]
        return result["comm"]

    # --- failure handling (the watchdog thread calls these too) -----------------------------------

    def _set_error(self, error: CommunicatorError) -> None:
        with self._error_lock:
            if self._error is None:
                self._error = error

    def _fail(self, error: CommunicatorError) -> None:
        """Marks the communicator failed (the first error stays) and aborts it, now or once the NCCL call
        some thread is inside returns."""
        self._set_error(error)
        if not self._abort_if_idle():
            logger.error("%s; a thread is inside an NCCL call on it, so the abort waits for that call to return "
                         "(if it never does, retire this process)", error)

    def _abort_if_idle(self) -> bool:
        """Aborts the failed communicator unless a thread is inside an NCCL call on it; True once aborted.

        Never under a live call: CuPy's abort() frees the ncclComm that a concurrent send()/groupEnd() is
        still using (a use after free, not a clean error). Nor is any call here known to be a non-blocking
        enqueue: CuPy makes only blocking communicators (ncclCommInitRank), and its init takes the
        ncclInProgress of NCCL_COMM_BLOCKING=0 for an error. After the init warm-up host calls do not wait on
        peers, so an in-flight call returns soon and its thread aborts on the way out (`_enqueue`); one that
        never returns leaves the rank busy past the group's step timeout, and the cluster retires the process."""
        if not self._nccl_lock.acquire(blocking=False):
            return False
        try:
            self._abort_locked()
        finally:
            self._nccl_lock.release()
        return True

    def _abort_locked(self) -> None:
        # The pending operations keep their buffers: a stalled kernel may touch them until it sees the abort.
        if not self._released:
            self._released = True
            self._comm.abort()

    def _check_async_error(self) -> None:
        if not self._nccl_lock.acquire(blocking=False):
            return  # a thread is inside an NCCL call: look at the next poll
        try:
            if self._released:
                return
            self._comm.check_async_error()
        except self._nccl.NcclError as e:
            self._set_error(CommunicatorError(f"rank {self.rank}: NCCL reported an asynchronous error: {e}",
                                              rank=self.rank, op="async"))
            self._abort_locked()
        finally:
            self._nccl_lock.release()

    @property
    def broken(self) -> bool:
        return self._error is not None

    def _raise_if_broken(self, op: str) -> None:
        if self._error is not None:
            raise type(self._error)(f"rank {self.rank}: {op}: the communicator is broken: {self._error}",
                                    rank=self.rank, op=op, missing_ranks=self._error.missing_ranks)

    def _next_op(self, name: str, label: str = "") -> str:
        op = f"{name} #{self._seq}" + (f" ({label})" if label else "")
        self._seq += 1
        self._raise_if_broken(op)
        self._streams.bind_thread()  # the caller's thread need not be the one that made the communicator
        return op

    def _enqueue(self, op: str, peers: list[int], buffers: tuple, enqueue: Callable[[int], None]) -> None:
        """Runs the host-side NCCL calls of one operation under the watchdog's deadline.

        Raises:
            CommunicatorError / CommunicatorTimeout: the communicator is (or was just) broken.
            whatever `enqueue` raised other than an NcclError; the communicator is broken then too.
        """
        entry = self._watchdog.begin(op, peers)
        event = None
        with self._nccl_lock:
            try:
                self._raise_if_broken(op)  # the watchdog may have failed it since _next_op
                try:
                    enqueue(self._streams.stream())
                finally:
                    # Covers whatever part of the operation reached the stream, so the watchdog releases this
                    # entry (and those behind it) in stream order instead of timing it out.
                    event = self._streams.record_event()
            except Exception as e:
                is_nccl_error = isinstance(e, self._nccl.NcclError)
                if not isinstance(e, CommunicatorError):
                    # Some of the group's calls may have reached NCCL and the rest not: peers would wait on the
                    # missing part, so the communicator is broken whatever the error was.
                    detail = str(e) if is_nccl_error else f"{type(e).__name__}: {e}"
                    self._set_error(CommunicatorError(f"rank {self.rank}: {op} failed: {detail}", rank=self.rank,
                                                      op=op))
                if is_nccl_error:
                    raise self._error from e
                raise
            finally:
                self._watchdog.end(entry, event, buffers)
                if self._error is not None:
                    self._abort_locked()  # the NCCL calls are over: nothing else is inside one now
        self._raise_if_broken(op)  # the watchdog failed it while the calls were in flight

    def _wait(self, result: torch.Tensor, op: str) -> torch.Tensor:
        """Blocks the host until the work enqueued so far is done (or aborted); raises if it failed."""
        self._streams.record_event().synchronize()
        self._raise_if_broken(op)
        return result

    # --- collectives -----------------------------------------------------------------------------

    def all_to_all(self, send: torch.Tensor, send_counts: Sequence[int], recv_counts: Sequence[int], *,
                   label: str = "") -> torch.Tensor:
        self._check_all_to_all_args(send, send_counts, recv_counts)
        op = self._next_op("all_to_all", label)
        send = send.contiguous()
        recv = send.new_empty((sum(recv_counts), *send.shape[1:]))
        plan = plan_all_to_all(self.rank, send_counts, recv_counts, math.prod(send.shape[1:]) * send.element_size())
        if plan.sends or plan.recvs:
            nccl, comm, send_ptr, recv_ptr = self._nccl, self._comm, send.data_ptr(), recv.data_ptr()

            def enqueue(stream: int) -> None:
                nccl.groupStart()
                try:
                    for t in plan.sends:
                        comm.send(send_ptr + t.offset_bytes, t.nbytes, nccl.NCCL_UINT8, t.peer, stream)
                    for t in plan.recvs:
                        comm.recv(recv_ptr + t.offset_bytes, t.nbytes, nccl.NCCL_UINT8, t.peer, stream)
                finally:
                    nccl.groupEnd()

            self._enqueue(op, plan.peers, (send, recv), enqueue)
        if plan.local is not None:
            src, dst, n = plan.local
            recv[dst:dst + n].copy_(send[src:src + n])
        return recv if self._streams.stream_ordered else self._wait(recv, op)

    def exchange_counts(self, counts: torch.Tensor, *, label: str = "") -> tuple[list[list[int]], list[list[int]]]:
        if counts.dim() != 2 or counts.shape[0] != self.world_size:
            raise ValueError(f"counts must be [world_size={self.world_size}, C], got {tuple(counts.shape)}")
        ones = [1] * self.world_size
        received = self.all_to_all(counts.contiguous(), ones, ones, label=label)
        both = self._wait(torch.stack((counts, received)), f"exchange_counts ({label})").tolist()
        return both[0], both[1]

    def _collective(self, name: str, mine: torch.Tensor, out: torch.Tensor, call: Callable[[int], None]) -> None:
        op = self._next_op(name)
        self._enqueue(op, [r for r in range(self.world_size) if r != self.rank], (mine, out), call)
        self._wait(out, op)

    def all_gather_ints(self, values: Sequence[int]) -> list[list[int]]:
        mine = torch.tensor(list(values), dtype=torch.int64, device=self.device)
        out = torch.empty(self.world_size * mine.numel(), dtype=torch.int64, device=self.device)
        self._collective("all_gather", mine, out, lambda stream: self._comm.allGather(
            mine.data_ptr(), out.data_ptr(), mine.numel(), self._nccl.NCCL_INT64, stream))
        return out.view(self.world_size, -1).tolist()

    def all_reduce_ints(self, values: Sequence[int], op: str = "sum") -> list[int]:
        self._check_reduce_op(op)
        return self._all_reduce(values, op, f"all_reduce ({op})")

    def _all_reduce(self, values: Sequence[int], op: str, name: str) -> list[int]:
        nccl = self._nccl
        nccl_op = {"sum": nccl.NCCL_SUM, "max": nccl.NCCL_MAX, "min": nccl.NCCL_MIN}[op]
        mine = torch.tensor(list(values), dtype=torch.int64, device=self.device)
        out = torch.empty_like(mine)
        self._collective(name, mine, out, lambda stream: self._comm.allReduce(
            mine.data_ptr(), out.data_ptr(), mine.numel(), nccl.NCCL_INT64, nccl_op, stream))
        return out.tolist()

    def barrier(self) -> None:
        self._all_reduce([0], "sum", "barrier")

    def close(self) -> None:
        """Destroys the NCCL communicator when it is clean; aborts it when it failed or some operation is
        unfinished (ncclCommDestroy would wait for that work, forever if a peer is gone)."""
        self._watchdog.stop()
        self._streams.bind_thread()
        closed = CommunicatorError(f"rank {self.rank}: the communicator was closed", rank=self.rank, op="close")
        if not self._nccl_lock.acquire(timeout=_CLOSE_LOCK_WAIT_S):
            self._set_error(closed)  # the thread inside an NCCL call aborts on its way out (_enqueue)
            return
        try:
            clean = self._error is None and not self._watchdog.has_unfinished()
            self._set_error(closed)
            if not self._released:
                self._released = True
                if clean:
                    self._comm.destroy()
                else:
                    self._comm.abort()
        finally:
            self._nccl_lock.release()
