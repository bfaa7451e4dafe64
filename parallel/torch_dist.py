"""The torch_dist backend: torch.distributed's gloo (CPU) or nccl (GPU) through a private process group.

The process group is built directly on a TCP store (no `init_process_group`, no global default group), so
constructing a communicator touches no global distributed state and a process may hold several.

Timeouts: every collective fails within `timeout_s`. The process group's own timeout is `timeout_s`
less a short grace period (<= 1 s); when a collective fails, the rank reports it to the store and spends
the grace period collecting the other live ranks' reports: the ranks that never report are the missing
peers the error names (gloo's own errors give only an address).
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist

from parallel.comm import Communicator, CommunicatorError, CommunicatorTimeout, resolve_cuda_device

# After a failed collective, how long a rank waits for the other live ranks' failure reports (they fail
# at about the same moment: the one the missing peer left them all waiting for). Taken out of timeout_s.
_MAX_DIAGNOSIS_GRACE_S = 1.0
_REDUCE_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


class TorchDistCommunicator(Communicator):
    """One rank of a torch.distributed group.

    Args:
        rank, world_size: this rank and G.
        master_addr, master_port: the rendezvous TCP store.
        timeout_s: deadline of every collective.
        backend: "gloo" (CPU tensors) or "nccl" (CUDA tensors on `device`).
        device: nccl: the rank's GPU (default: the current one).
        host_store: this process hosts the TCP store (rank 0 by default, or a process outside the group
            that created `dist.TCPStore(..., is_master=True)` itself).
        join_timeout_s: deadline of the rendezvous, for every rank to join (None: `timeout_s`).
    Raises:
        CommunicatorTimeout: the store was unreachable or some rank did not join within `join_timeout_s`.
    """

    backend = "torch_dist"

    def __init__(self, rank: int, world_size: int, master_addr: str, master_port: int, timeout_s: float = 60.0,
                 *, backend: str = "gloo", device: str | torch.device | None = None, host_store: bool | None = None,
                 join_timeout_s: float | None = None):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        if backend not in ("gloo", "nccl"):
            raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.rank, self.world_size, self.timeout_s, self.torch_backend = rank, world_size, float(timeout_s), backend
        self.join_timeout_s = float(join_timeout_s or timeout_s)
        if backend == "nccl" and not dist.is_nccl_available():
            raise ValueError("backend 'nccl' needs a CUDA build of torch with NCCL; this one has none")
        self.device = torch.device("cpu") if backend == "gloo" else resolve_cuda_device(device)
        self._seq = 0
        self._error: CommunicatorError | None = None
        self._grace_s = min(_MAX_DIAGNOSIS_GRACE_S, timeout_s / 4)
        timeout = datetime.timedelta(seconds=self.join_timeout_s)
        op_timeout = datetime.timedelta(seconds=timeout_s - self._grace_s)
        host_store = rank == 0 if host_store is None else host_store
        try:
            store = dist.TCPStore(master_addr, master_port, world_size, is_master=host_store, timeout=timeout,
                                  wait_for_workers=False)
        except (RuntimeError, OSError) as e:
            raise CommunicatorTimeout(f"rank {rank}: could not reach the group's store at {master_addr}:{master_port} "
                                      f"within {self.join_timeout_s} s ({e})", rank=rank, op="init") from e
        self._store = dist.PrefixStore("gptoss-ep/", store)
        self._rendezvous()
        pg_store = dist.PrefixStore("pg/", store)
        if backend == "gloo":
            self._pg = dist.ProcessGroupGloo(pg_store, rank, world_size, op_timeout)
        else:
            options = dist.ProcessGroupNCCL.Options()
            options._timeout = op_timeout
            self._pg = dist.ProcessGroupNCCL(pg_store, rank, world_size, options)

    def _rendezvous(self) -> None:
        """Waits for every rank to join; names those that do not within the timeout."""
        self._store.set(f"join/{self.rank}", "1")
        keys = [f"join/{r}" for r in range(self.world_size)]
        try:
            self._store.wait(keys, datetime.timedelta(seconds=self.join_timeout_s))
        except RuntimeError as e:
            missing = [r for r in range(self.world_size) if not self._store_has(f"join/{r}")]
            raise CommunicatorTimeout(f"rank {self.rank}: ranks {missing} did not join the group within "
                                      f"{self.join_timeout_s} s", rank=self.rank, op="init", missing_ranks=missing) from e

    def _store_has(self, key: str) -> bool:
        try:
            return self._store.check([key])
        except RuntimeError:
            return False

    # --- collectives -----------------------------------------------------------------------------

    def _run(self, name: str, fn: Callable[[], None], label: str = "") -> None:
        op = f"{name} #{self._seq}" + (f" ({label})" if label else "")
        if self._error is not None:
            raise type(self._error)(f"rank {self.rank}: {op}: the communicator is broken: {self._error}",
                                    rank=self.rank, op=op, missing_ranks=self._error.missing_ranks)
        seq = self._seq
        self._seq += 1
        try:
            fn()
        except RuntimeError as e:
            self._error = self._diagnose(op, seq, e)
            self._pg.abort()  # a failed gloo group left alone aborts the process at exit
            raise self._error from e

    def _diagnose(self, op: str, seq: int, cause: RuntimeError) -> CommunicatorError:
        """Reports this rank's failure to the store and collects the other live ranks' reports."""
        grace_s = self._grace_s
        reports: dict[int, str] = {}
        try:
            self._store.set(f"failed/{self.rank}", f"{seq} {op}")
            deadline = time.monotonic() + grace_s
            while True:
                for r in range(self.world_size):
                    if r != self.rank and r not in reports and self._store.check([f"failed/{r}"]):
                        reports[r] = self._store.get(f"failed/{r}").decode()
                if len(reports) == self.world_size - 1 or time.monotonic() >= deadline:
                    break
                time.sleep(0.01)
            store_note = ""
        except RuntimeError as e:  # the store's host died with its process
            store_note = f"; the group's store is unreachable ({e})"
        missing = [r for r in range(self.world_size) if r != self.rank and r not in reports]
        elsewhere = [f"rank {r} failed in {text.split(' ', 1)[1]}" for r, text in sorted(reports.items())
                     if int(text.split(" ", 1)[0]) != seq]
        what = f"did not complete within {self.timeout_s} s" if "timed out" in str(cause).lower() else "failed"
        who = (f"ranks {missing} never arrived (no failure report from them within {grace_s:.1f} s: dead, or stuck "
               "outside this collective)" if missing else "every peer reported a failure too")
        detail = "; ".join([who, *elsewhere])
        message = f"rank {self.rank}: {op} {what}: {detail}{store_note} [{self.torch_backend}: {cause}]"
        # A peer that never arrived is a timeout whatever gloo saw first (its own deadline, or the
        # connection closed by a dead peer or by another rank giving up).
        cls = CommunicatorTimeout if missing or what != "failed" else CommunicatorError
        return cls(message, rank=self.rank, op=op, missing_ranks=missing)

    def all_to_all(self, send: torch.Tensor, send_counts: Sequence[int], recv_counts: Sequence[int], *,
                   label: str = "") -> torch.Tensor:
        self._check_all_to_all_args(send, send_counts, recv_counts)
        send = send.contiguous()
        recv = send.new_empty((sum(recv_counts), *send.shape[1:]))
        self._run("all_to_all", lambda: self._pg.alltoall_base(recv, send, list(recv_counts), list(send_counts)).wait(),
                  label)
        return recv

    def all_gather_ints(self, values: Sequence[int]) -> list[list[int]]:
        mine = torch.tensor(list(values), dtype=torch.int64, device=self.device)
        parts = [torch.empty_like(mine) for _ in range(self.world_size)]
        self._run("all_gather", lambda: self._pg.allgather([parts], [mine]).wait())
        return torch.stack(parts).tolist()

    def all_reduce_ints(self, values: Sequence[int], op: str = "sum") -> list[int]:
        self._check_reduce_op(op)
        tensor = torch.tensor(list(values), dtype=torch.int64, device=self.device)
        options = dist.AllreduceOptions()
        options.reduceOp = _REDUCE_OPS[op]
        self._run("all_reduce", lambda: self._pg.allreduce([tensor], options).wait(), op)
        return tensor.tolist()

    def barrier(self) -> None:
        self._run("barrier", lambda: self._pg.barrier().wait())

    def close(self) -> None:
        if self._error is None:
            self._error = CommunicatorError(f"rank {self.rank}: the communicator was closed", rank=self.rank,
                                            op="close")
            self._pg.shutdown()
