"""The loopback backend: all G ranks of a group inside one process, one thread per rank.

For fast, deterministic unit tests of everything above the communicator. Every collective is a
rendezvous on a shared board: each rank posts its part under the collective's sequence number and waits
(up to `timeout_s`) for the others. Because it sees every rank, it checks more than a real backend can:
that all ranks call the same collective (lockstep) and that all-to-all counts agree pairwise.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from parallel.comm import Communicator, CommunicatorError, CommunicatorTimeout


class LoopbackGroup:
    """G in-process ranks. `group.communicators()[r]` is rank r's end; call each from its own thread,
    or let `group.run(fn)` do that."""

    def __init__(self, world_size: int, timeout_s: float = 30.0):
        if world_size <= 0:
            raise ValueError(f"world_size must be > 0, got {world_size}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.world_size, self.timeout_s = world_size, timeout_s
        self._cond = threading.Condition()
        self._board: dict[int, dict[int, tuple[str, Any]]] = {}  # seq -> rank -> (op, part)
        self._reads: dict[int, int] = {}  # seq -> ranks that have read the result
        self._error: CommunicatorError | None = None
        self._comms = [LoopbackCommunicator(self, r) for r in range(world_size)]

    def communicators(self) -> list[LoopbackCommunicator]:
        return list(self._comms)

    def abort(self, reason: str) -> None:
        """Breaks the group: ranks waiting in (or later calling) a collective raise CommunicatorError."""
        with self._cond:
            if self._error is None:
                self._error = CommunicatorError(f"loopback group aborted: {reason}", rank=-1, op="abort")
            self._cond.notify_all()

    def run(self, fn: Callable[[LoopbackCommunicator], Any], timeout_s: float | None = None) -> list[Any]:
        """Runs `fn(comm)` for every rank in its own thread; returns the results by rank.

        The first rank to raise aborts the group (so the others do not wait out their timeouts) and its
        exception is re-raised here.
        """
        results: list[Any] = [None] * self.world_size
        errors: list[Exception] = []  # in the order raised: the first is the cause

        def body(rank: int) -> None:
            try:
                results[rank] = fn(self._comms[rank])
            except Exception as e:  # handed to the caller below
                with self._cond:
                    errors.append(e)
                self.abort(f"rank {rank} raised {type(e).__name__}: {e}")

        threads = [threading.Thread(target=body, args=(r,), name=f"loopback-rank-{r}", daemon=True)
                   for r in range(self.world_size)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + (timeout_s if timeout_s is not None else 10 * self.timeout_s)
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        if any(t.is_alive() for t in threads):
            self.abort("run() timed out")
            raise TimeoutError(f"loopback ranks {[r for r, t in enumerate(threads) if t.is_alive()]} still running")
        if errors:
            raise errors[0]
        return results

    def _exchange(self, rank: int, seq: int, op: str, part: Any) -> list[Any]:
        """Posts `part` for collective `seq`, waits for all ranks' parts, returns them by rank."""
        deadline = time.monotonic() + self.timeout_s
        with self._cond:
            if self._error is not None:
                raise _broken(self._error, rank, op)
            slot = self._board.setdefault(seq, {})
            slot[rank] = (op, part)
            self._cond.notify_all()
            while len(slot) < self.world_size and self._error is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    missing = [r for r in range(self.world_size) if r not in slot]
                    err = CommunicatorTimeout(
                        f"rank {rank}: {op} did not complete within {self.timeout_s} s: ranks {missing} never "
                        "arrived", rank=rank, op=op, missing_ranks=missing)
                    self._error = self._error or err
                    self._cond.notify_all()
                    raise err
                self._cond.wait(left)
            if len(slot) < self.world_size:
                raise _broken(self._error, rank, op)
            ops = {slot[r][0] for r in range(self.world_size)}
            if len(ops) > 1:
                calls = ", ".join(f"rank {r}: {slot[r][0]}" for r in range(self.world_size))
                err = CommunicatorError(f"ranks are out of lockstep at collective #{seq} ({calls})",
                                        rank=rank, op=op)
                self._error = self._error or err
                self._cond.notify_all()
                raise err
            parts = [slot[r][1] for r in range(self.world_size)]
            self._reads[seq] = self._reads.get(seq, 0) + 1
            if self._reads[seq] == self.world_size:
                del self._board[seq], self._reads[seq]
            return parts


class LoopbackCommunicator(Communicator):
    backend = "loopback"

    def __init__(self, group: LoopbackGroup, rank: int):
        self._group, self.rank, self.world_size = group, rank, group.world_size
        self.device, self.timeout_s = torch.device("cpu"), group.timeout_s
        self._seq = 0

    def _collective(self, name: str, part: Any, label: str = "") -> list[Any]:
        seq = self._seq
        self._seq += 1
        return self._group._exchange(self.rank, seq, f"{name} #{seq}" + (f" ({label})" if label else ""), part)

    def all_to_all(self, send: torch.Tensor, send_counts: Sequence[int], recv_counts: Sequence[int], *,
                   label: str = "") -> torch.Tensor:
        self._check_all_to_all_args(send, send_counts, recv_counts)
        parts = self._collective("all_to_all", (send, list(send_counts)), label)
        op = f"all_to_all #{self._seq - 1}" + (f" ({label})" if label else "")
        chunks = []
        for src, (src_send, src_counts) in enumerate(parts):
            if src_counts[self.rank] != recv_counts[src]:
                raise ValueError(f"rank {self.rank}: recv_counts[{src}]={recv_counts[src]} but rank {src} sends "
                                 f"{src_counts[self.rank]} rows here ({op})")
            if src_send.shape[1:] != send.shape[1:] or src_send.dtype != send.dtype:
                raise ValueError(f"rank {self.rank}: rank {src} sends rows {tuple(src_send.shape[1:])} "
                                 f"{src_send.dtype}, this rank {tuple(send.shape[1:])} {send.dtype} ({op})")
            start = sum(src_counts[: self.rank])
            chunks.append(src_send[start:start + recv_counts[src]])
        return torch.cat(chunks)  # a copy: never aliases a peer's buffer

    def all_gather_ints(self, values: Sequence[int]) -> list[list[int]]:
        parts = self._collective("all_gather", [int(v) for v in values])
        if len({len(p) for p in parts}) > 1:
            raise ValueError(f"all_gather_ints: ranks passed different lengths {[len(p) for p in parts]}")
        return parts

    def all_reduce_ints(self, values: Sequence[int], op: str = "sum") -> list[int]:
        self._check_reduce_op(op)
        parts = self.all_gather_ints(values)
        reduce = {"sum": sum, "max": max, "min": min}[op]
        return [reduce(column) for column in zip(*parts, strict=True)]

    def barrier(self) -> None:
        self._collective("barrier", None)


def _broken(cause: CommunicatorError, rank: int, op: str) -> CommunicatorError:
    cls = type(cause)
    return cls(f"rank {rank}: {op}: the group is broken: {cause}", rank=rank, op=op,
               missing_ranks=cause.missing_ranks)
