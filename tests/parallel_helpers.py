"""Helpers for the parallel/ tests: spawned rank processes, their workers, and a fake of CuPy's NCCL module.

Workers live here (not in the test modules) so spawned processes import them by a stable name.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing as mp
import os
import pickle
import queue
import threading
import time
import traceback
import types
from collections import defaultdict, deque
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

import gptoss
from gptoss import ModelConfig, get_preset
from parallel import (
    CommunicatorError,
    CupyNcclCommunicator,
    ExpertPlacement,
    TorchDistCommunicator,
    apply_expert_parallel,
)

# 16 experts (top-4) so that G = 2 and 4 both split them, a small vocabulary to keep logits cheap.
EP_CONFIG: ModelConfig = get_preset("tiny").replace(num_local_experts=16, vocab_size=1024)


def mute_experts(model: gptoss.Transformer, layer_to_experts: dict[int, list[int]]) -> None:
    """Makes the router never pick these experts (so they, or a whole rank, receive no tokens)."""
    for layer, experts in layer_to_experts.items():
        model.layers[layer].mlp.router.bias.data[experts] = -1e4


# --- spawned rank processes ----------------------------------------------------------------------


def run_spawned(target: Callable[..., Any], world_size: int, *args: Any, timeout_s: float = 120.0,
                on_report: Callable[[dict[int, Any]], None] | None = None) -> list[Any]:
    """Runs `target(rank, world_size, store_port, *args)` in `world_size` fresh processes; returns the
    results by rank (None for a rank whose process exited cleanly without one). This process hosts the
    rendezvous store (so no port is guessed, and it outlives any rank). `on_report(results so far)` runs
    after each rank reports. Every child is gone when this returns: reaped, or killed after `timeout_s`.

    Raises:
        AssertionError: some rank raised (its traceback is in the message), or died with an error code.
        TimeoutError: some rank did not finish within `timeout_s`.
    """
    ctx = mp.get_context("spawn")
    store = dist.TCPStore("127.0.0.1", 0, world_size, is_master=True, wait_for_workers=False)
    results: queue.Queue = ctx.Queue()
    procs = [ctx.Process(target=_child, args=(target, rank, world_size, store.port, results, args), daemon=True,
                         name=f"ep-rank-{rank}") for rank in range(world_size)]
    reports: dict[int, tuple[bool, Any]] = {}
    deadline = time.monotonic() + timeout_s
    try:
        for p in procs:
            p.start()
        while len(reports) < world_size:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"ranks {sorted(set(range(world_size)) - set(reports))} did not finish "
                                   f"within {timeout_s} s")
            try:
                rank, ok, value = results.get(timeout=min(left, 0.5))
                reports[rank] = (ok, pickle.loads(value) if ok else value)
                if on_report is not None:
                    on_report({r: v for r, (_, v) in reports.items()})
            except queue.Empty:
                # Nothing left in the pipe: a rank that has exited by now never reported.
                for r, p in enumerate(procs):
                    if r not in reports and p.exitcode == 0:
                        reports[r] = (True, None)
                    elif r not in reports and p.exitcode is not None:
                        raise AssertionError(f"rank {r} died with exit code {p.exitcode} without reporting") from None
    finally:
        for p in procs:
            p.join(max(1.0, min(10.0, deadline - time.monotonic())))
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)
        results.close()
        results.join_thread()
    failed = {r: v for r, (ok, v) in sorted(reports.items()) if not ok}
    if failed:
        raise AssertionError("".join(f"\n--- rank {r} ---\n{tb}" for r, tb in failed.items()))
    return [reports[r][1] for r in range(world_size)]


def _child(target, rank, world_size, port, results, args) -> None:
    torch.set_num_threads(1)
    try:
        # Plain pickle: tensors by value (torch's queue reducer would share them through this process,
        # which is about to exit).
        results.put((rank, True, pickle.dumps(target(rank, world_size, port, *args))))
    except BaseException:  # noqa: B036 - reported to the parent, which fails the test
        results.put((rank, False, traceback.format_exc()))


def gloo_communicator(rank: int, world_size: int, port: int, timeout_s: float) -> TorchDistCommunicator:
    return TorchDistCommunicator(rank, world_size, "127.0.0.1", port, timeout_s, host_store=False)


def gloo_ep_worker(rank: int, world_size: int, port: int, checkpoint: str, moe_inputs: list[list[torch.Tensor]],
                   token_ids: list[torch.Tensor], muted: dict[int, list[int]]) -> dict[str, Any]:
    """One rank of a gloo EP group: collectives, then every layer's MoE and the whole model on its inputs."""
    comm = gloo_communicator(rank, world_size, port, timeout_s=60)
    # Small collectives and an uneven all-to-all with a known answer: rank r sends r + d rows to rank d.
    gathered = comm.all_gather_ints([rank, 10 * rank])
    reduced = {op: comm.all_reduce_ints([rank, -rank], op) for op in ("sum", "max", "min")}
    comm.barrier()
    send_counts = [rank + d for d in range(world_size)]
    recv_counts = [s + rank for s in range(world_size)]
    send = torch.cat([torch.full((n, 3), 100.0 * rank + d) for d, n in enumerate(send_counts)])
    exchanged = comm.all_to_all(send, send_counts, recv_counts)

    placement = ExpertPlacement.contiguous(EP_CONFIG.num_local_experts, world_size)
    model = gptoss.load_model(checkpoint, dtype=torch.float32, experts=placement.expert_ids(rank))
    mute_experts(model, muted)
    expert_token_counts = apply_expert_parallel(model, comm, placement)
    moe_out = [model.layers[i].mlp(x) for i, x in enumerate(moe_inputs[rank])]
    expert_token_counts.take_counts()
    logits = model(token_ids[rank])
    counts = expert_token_counts.take_counts()
    comm.close()
    return dict(gathered=gathered, reduced=reduced, exchanged=exchanged, moe_out=moe_out, logits=logits,
                counts=counts)


def gloo_missing_peer_worker(rank: int, world_size: int, port: int, missing_rank: int, how: str,
                             timeout_s: float, bound_s: float, release: Any) -> dict[str, Any] | None:
    """Every rank joins and exchanges once; then `missing_rank` never arrives at the next all-to-all:
    how="stuck" it waits (alive) until `release` is set, how="dead" its process exits, how="never_joins"
    it never even creates its communicator. A rank whose all-to-all has not ended `bound_s` after it
    began raises TimeoutError (the test fails) instead of waiting on."""
    if rank == missing_rank and how == "never_joins":
        release.wait(60)
        return None
    try:
        comm = gloo_communicator(rank, world_size, port, timeout_s)
    except CommunicatorError as e:
        return dict(error=type(e).__name__, missing_ranks=e.missing_ranks, op=e.op, message=str(e))
    ones = [1] * world_size
    comm.all_to_all(torch.zeros(world_size, 4), ones, ones)
    if rank == missing_rank:
        if how == "dead":
            os._exit(0)
        release.wait(60)
        return None
    result: dict[str, Any] = {}

    def exchange() -> None:
        try:
            comm.all_to_all(torch.zeros(world_size, 4), ones, ones, label="layer 0 dispatch")
            result.update(error=None)
        except CommunicatorError as e:
            try:
                comm.barrier()
                broken = "barrier passed"
            except CommunicatorError as later:
                broken = str(later)
            result.update(error=type(e).__name__, missing_ranks=e.missing_ranks, op=e.op, message=str(e),
                          later=broken)
        except Exception as e:  # reported by the rank's own thread below
            result.update(raised=e)

    # A daemon thread: one left stuck in gloo does not keep this process from exiting with the report.
    thread = threading.Thread(target=exchange, name=f"rank{rank}-exchange", daemon=True)
    thread.start()
    thread.join(bound_s)
    if thread.is_alive():
        raise TimeoutError(f"rank {rank}: the all-to-all that rank {missing_rank} misses did not end within "
                           f"{bound_s} s (its deadline is {timeout_s} s)")
    if "raised" in result:
        raise result["raised"]
    return result


def nccl_ep_worker(rank: int, world_size: int, port: int, unique_id: bytes, checkpoint: str,
                   moe_inputs: list[torch.Tensor], token_ids: list[torch.Tensor]) -> dict[str, Any]:
    """One rank of a real NCCL group on GPU `rank` (needs >= world_size GPUs)."""
    device = torch.device("cuda", rank)
    torch.cuda.set_device(device)
    comm = CupyNcclCommunicator(rank, world_size, unique_id, timeout_s=60, device=device)
    send_counts = [rank + d for d in range(world_size)]
    recv_counts = [s + rank for s in range(world_size)]
    send = torch.cat([torch.full((n, 3), 100.0 * rank + d, device=device) for d, n in enumerate(send_counts)])
    exchanged = comm.all_to_all(send, send_counts, recv_counts).cpu()
    gathered = comm.all_gather_ints([rank, 10 * rank])
    reduced = comm.all_reduce_ints([rank, -rank], "max")
    placement = ExpertPlacement.contiguous(EP_CONFIG.num_local_experts, world_size)
    model = gptoss.load_model(checkpoint, dtype=torch.float32, device=device, experts=placement.expert_ids(rank))
    apply_expert_parallel(model, comm, placement)
    moe_out = model.layers[0].mlp(moe_inputs[rank].to(device)).cpu()
    logits = model(token_ids[rank].to(device)).cpu()
    comm.close()
    return dict(exchanged=exchanged, gathered=gathered, reduced=reduced, moe_out=moe_out, logits=logits)


# --- a recording fake of cupy.cuda.nccl ------------------------------------------------------------


class FakeNcclError(RuntimeError):
    pass


class FakeNccl:
    """A fake `cupy.cuda.nccl` for G ranks that run as threads of this process, on CPU tensors.

    It records every call per rank and really moves the bytes (ctypes.memmove between the CPU buffers)
    when a send meets its receive, in per-pair FIFO order like NCCL. The work of a rank completes when
    matched; `streams(rank)` gives the backend events that complete accordingly (or on abort).

    Also, like the real thing:
    - the unique id is a tuple of C `char`s, signed (x86) or unsigned (aarch64) per `char_is_signed`, and a
      value outside that range raises OverflowError as Cython's conversion does;
    - the device current in the calling thread (set by `FakeStreams.bind_thread`, device i for rank i) is
      recorded with every NCCL and CUDA call in `devices`;
    - an abort while another thread is inside an NCCL call on that communicator (in CuPy, a use after free),
      or any call after the abort, is recorded in `used_after_free`;
    - destroy with unfinished work raises (ncclCommDestroy would wait for it, forever if a peer is gone);
    - `inject(rank, kind, index, ...)` makes one call raise or block.
    """

    NCCL_UINT8, NCCL_INT64 = 1, 4  # the values of cupy.cuda.nccl
    NCCL_SUM, NCCL_MAX, NCCL_MIN = 0, 2, 3

    def __init__(self, world_size: int, *, char_is_signed: bool = True):
        self.world_size = world_size
        self.char_range = range(-128, 128) if char_is_signed else range(256)
        self.cond = threading.Condition()
        self.calls: dict[int, list[tuple]] = defaultdict(list)  # rank -> recorded calls
        self.sends: dict[tuple[int, int], deque] = defaultdict(deque)  # (src, dst) -> [(ptr, nbytes, src, op_id)]
        self.recvs: dict[tuple[int, int], deque] = defaultdict(deque)  # (src, dst) -> [(ptr, nbytes, dst, op_id)]
        self.collectives: dict[tuple[str, int], dict[int, tuple]] = {}  # (kind, seq) -> rank -> args
        self.collective_seq: dict[int, int] = defaultdict(int)
        self.enqueued: dict[int, int] = defaultdict(int)  # rank -> ops enqueued
        self.completed: dict[int, set[int]] = defaultdict(set)
        self.joined: set[int] = set()
        self.aborted: set[int] = set()
        self.destroyed: set[int] = set()
        self.devices: dict[int, list[tuple[str, int | None, str]]] = defaultdict(list)  # rank -> (call, device, thread)
        self.in_call: dict[int, int] = defaultdict(int)  # rank -> threads inside an NCCL call now
        self.used_after_free: list[str] = []
        self.num_calls: dict[tuple[int, str], int] = defaultdict(int)  # (rank, kind) -> calls so far
        self.injected: dict[tuple[int, str, int], tuple[BaseException | None, Callable[[], bool] | None]] = {}
        self.local = threading.local()
        fake = self

        class NcclCommunicator:
            def __init__(self, ndev: int, comm_id: tuple, rank: int):
                assert ndev == fake.world_size and len(comm_id) == 128
                for b in comm_id:  # Cython's conversion of each value to C `char`
                    if b not in fake.char_range:
                        raise OverflowError(f"value {b} out of range for char {fake.char_range}")
                self.rank = rank
                fake.local.rank = rank
                with fake._nccl_call(rank, "init"), fake.cond:
                    fake.joined.add(rank)
                    fake.cond.notify_all()
                    if not fake.cond.wait_for(lambda: len(fake.joined) == fake.world_size, timeout=5):
                        raise FakeNcclError("init: not every rank joined")

            def send(self, ptr, count, datatype, peer, stream):
                with fake._nccl_call(self.rank, "send"):
                    fake._p2p("send", self.rank, peer, ptr, count, datatype, stream)

            def recv(self, ptr, count, datatype, peer, stream):
                with fake._nccl_call(self.rank, "recv"):
                    fake._p2p("recv", self.rank, peer, ptr, count, datatype, stream)

            def allGather(self, sendbuf, recvbuf, count, datatype, stream):
                with fake._nccl_call(self.rank, "allGather"):
                    fake._collective("allGather", self.rank, (sendbuf, recvbuf, count, None))

            def allReduce(self, sendbuf, recvbuf, count, datatype, op, stream):
                with fake._nccl_call(self.rank, "allReduce"):
                    fake._collective("allReduce", self.rank, (sendbuf, recvbuf, count, op))

            def check_async_error(self):
                with fake._nccl_call(self.rank, "check_async_error"):
                    pass

            def abort(self):
                with fake.cond:
                    if fake.in_call[self.rank]:
                        fake.used_after_free.append(f"rank {self.rank}: abort while a thread is inside an NCCL call")
                with fake._nccl_call(self.rank, "abort"), fake.cond:
                    fake.calls[self.rank].append(("abort",))
                    fake.aborted.add(self.rank)
                    # Like ncclCommAbort: this rank's unmatched transfers are gone (their buffers may be freed).
                    for transfers in (*fake.sends.values(), *fake.recvs.values()):
                        for t in [t for t in transfers if t[2] == self.rank]:
                            transfers.remove(t)
                    fake.cond.notify_all()

            def destroy(self):
                with fake._nccl_call(self.rank, "destroy"), fake.cond:
                    fake.calls[self.rank].append(("destroy",))
                    if not fake.done_up_to(self.rank, fake.enqueued[self.rank]):
                        raise FakeNcclError(f"rank {self.rank}: destroy with unfinished work would wait forever")
                    fake.destroyed.add(self.rank)

        module = types.ModuleType("cupy.cuda.nccl")
        module.NcclCommunicator, module.NcclError = NcclCommunicator, FakeNcclError
        module.groupStart, module.groupEnd = self._group_start, self._group_end
        module.get_unique_id = lambda: tuple(self.char_range[(i * 37) % 256] for i in range(128))
        for name in ("NCCL_UINT8", "NCCL_INT64", "NCCL_SUM", "NCCL_MAX", "NCCL_MIN"):
            setattr(module, name, getattr(self, name))
        self.module = module

    def install(self, monkeypatch) -> None:
        """Makes `from cupy.cuda import nccl` return this fake for the test."""
        cupy, cuda = types.ModuleType("cupy"), types.ModuleType("cupy.cuda")
        cupy.cuda, cuda.nccl = cuda, self.module
        for name, module in (("cupy", cupy), ("cupy.cuda", cuda), ("cupy.cuda.nccl", self.module)):
            monkeypatch.setitem(__import__("sys").modules, name, module)

    def streams(self, rank: int, stream_ordered: bool = False) -> FakeStreams:
        return FakeStreams(self, rank, stream_ordered)

    def inject(self, rank: int, kind: str, index: int, *, error: BaseException | None = None,
               block_until: Callable[[], bool] | None = None) -> None:
        """Rank `rank`'s call number `index` (from 0) of `kind` ("send", "groupEnd", ...) raises `error`
        before doing anything, or first stays inside the call until `block_until()` holds."""
        self.injected[(rank, kind, index)] = (error, block_until)

    # -- recording and matching --

    @contextlib.contextmanager
    def _nccl_call(self, rank: int, kind: str):
        self.record_device(rank, kind)
        with self.cond:
            if rank in self.aborted:
                self.used_after_free.append(f"rank {rank}: {kind} after abort")
            self.in_call[rank] += 1
            index = self.num_calls[(rank, kind)]
            self.num_calls[(rank, kind)] += 1
        try:
            error, block_until = self.injected.get((rank, kind, index), (None, None))
            if error is not None:
                raise error
            if block_until is not None:
                deadline = time.monotonic() + 30
                while not block_until():  # a blocking ncclGroupEnd: returns once the test lets it
                    assert time.monotonic() < deadline, f"rank {rank}: {kind} #{index} was never released"
                    time.sleep(0.01)
            yield
        finally:
            with self.cond:
                self.in_call[rank] -= 1
                self.cond.notify_all()

    def record_device(self, rank: int, call: str) -> None:
        self.devices[rank].append((call, getattr(self.local, "device", None), threading.current_thread().name))

    def _depth(self) -> int:
        return getattr(self.local, "depth", 0)

    def _group_start(self) -> None:
        with self._nccl_call(self.local.rank, "groupStart"):
            self.local.depth = self._depth() + 1
            self.calls[self.local.rank].append(("groupStart",))

    def _group_end(self) -> None:
        with self._nccl_call(self.local.rank, "groupEnd"):
            self.local.depth = self._depth() - 1
            self.calls[self.local.rank].append(("groupEnd",))
            with self.cond:
                self._match()

    def _p2p(self, kind: str, rank: int, peer: int, ptr: int, count: int, datatype: int, stream: int) -> None:
        self.local.rank = rank
        with self.cond:
            self.calls[rank].append((kind, peer, count, datatype, self._depth()))
            op_id = self.enqueued[rank]
            self.enqueued[rank] += 1
            pair = (rank, peer) if kind == "send" else (peer, rank)
            (self.sends if kind == "send" else self.recvs)[pair].append((ptr, count, rank, op_id))
            if self._depth() == 0:
                self._match()

    def _match(self) -> None:
        for pair in list(self.recvs):
            sends, recvs = self.sends[pair], self.recvs[pair]
            while sends and recvs:
                (s_ptr, s_n, src, s_id), (r_ptr, r_n, dst, r_id) = sends.popleft(), recvs.popleft()
                if s_n != r_n:
                    raise FakeNcclError(f"rank {src} sends {s_n} bytes to rank {dst}, which expects {r_n}")
                ctypes.memmove(r_ptr, s_ptr, s_n)
                self.completed[src].add(s_id)
                self.completed[dst].add(r_id)
        self.cond.notify_all()

    def _collective(self, kind: str, rank: int, args: tuple) -> None:
        with self.cond:
            self.calls[rank].append((kind, args[2]))
            seq = self.collective_seq[rank]
            self.collective_seq[rank] += 1
            op_id = self.enqueued[rank]
            self.enqueued[rank] += 1
            parts = self.collectives.setdefault((kind, seq), {})
            parts[rank] = (*args, op_id)
            if len(parts) == self.world_size:
                values = [list((ctypes.c_int64 * parts[r][2]).from_address(parts[r][0])) for r in range(self.world_size)]
                for r, (_, recvbuf, _, op, r_id) in parts.items():
                    if kind == "allGather":
                        out = [v for vs in values for v in vs]
                    else:
                        reduce = {self.NCCL_SUM: sum, self.NCCL_MAX: max, self.NCCL_MIN: min}[op]
                        out = [reduce(column) for column in zip(*values, strict=True)]
                    (ctypes.c_int64 * len(out)).from_address(recvbuf)[:] = out
                    self.completed[r].add(r_id)
                self.cond.notify_all()

    def done_up_to(self, rank: int, upto: int) -> bool:
        return rank in self.aborted or all(i in self.completed[rank] for i in range(upto))


class FakeStreams:
    """The backend's `StreamOps` for a fake rank (device i for rank i): an event covers the rank's work
    enqueued before it."""

    def __init__(self, fake: FakeNccl, rank: int, stream_ordered: bool = False):
        self.fake, self.rank = fake, rank
        # False: CPU tensors, nothing orders torch's later reads after the fake's copies. True: all_to_all
        # returns before its data has arrived, as on a GPU.
        self.stream_ordered = stream_ordered

    def bind_thread(self) -> None:
        self.fake.local.rank = self.fake.local.device = self.rank

    def stream(self) -> int:
        self.fake.local.rank = self.rank  # attributes the module-level groupStart/groupEnd to this rank
        return 1000 + self.rank

    def record_event(self) -> FakeEvent:
        self.fake.record_device(self.rank, "record_event")
        with self.fake.cond:
            return FakeEvent(self.fake, self.rank, self.fake.enqueued[self.rank])


class FakeEvent:
    def __init__(self, fake: FakeNccl, rank: int, upto: int):
        self.fake, self.rank, self.upto = fake, rank, upto

    def query(self) -> bool:
        with self.fake.cond:
            return self.fake.done_up_to(self.rank, self.upto)

    def synchronize(self) -> None:
        self.fake.record_device(self.rank, "event_synchronize")
        with self.fake.cond:
            # Like a stream wait: returns once the work is done or the communicator was aborted.
            if not self.fake.cond.wait_for(lambda: self.fake.done_up_to(self.rank, self.upto), timeout=60):
                raise AssertionError(f"fake rank {self.rank}: work never completed and was never aborted")
