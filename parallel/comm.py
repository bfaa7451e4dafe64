"""The communicator interface every backend implements, its errors, and the factory the cluster layer calls.

A communicator connects the G ranks of one EP group. Every rank calls the same collectives in the same
order (lockstep); a rank with nothing to send still calls them with zero counts. Every collective has a
deadline (`timeout_s`; joining at init has its own, `join_timeout_s`): a peer that never arrives makes
the others raise `CommunicatorTimeout`, which names the operation and, where the backend can tell, the
missing ranks. After any error the communicator is broken for good (the group is the unit of failure):
every later call raises at once.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from gptoss.errors import ServerError

REDUCE_OPS = ("sum", "max", "min")


class CommunicatorError(ServerError):
    """A collective failed; the EP group cannot go on (restart it).

    Attributes:
        rank: the rank that raised.
        op: the operation, e.g. "all_to_all #12 (layer 3 dispatch)".
        missing_ranks: the peers found absent (empty when the backend cannot tell).
    """

    def __init__(self, message: str, *, rank: int, op: str, missing_ranks: Sequence[int] = ()):
        super().__init__(message)
        self.rank, self.op, self.missing_ranks = rank, op, sorted(missing_ranks)


class CommunicatorTimeout(CommunicatorError):
    """A collective did not complete: some peer never arrived (stuck elsewhere, or dead) within `timeout_s`."""


class Communicator(ABC):
    """One rank's end of an EP group's communicator. Not thread-safe: one thread calls it.

    Tensors passed in live on `device`; the host-side collectives (`*_ints`, `exchange_counts`) block
    until done, `all_to_all` may return before the data has arrived on a GPU backend (stream-ordered,
    like any CUDA op on the current stream).
    """

    backend: str
    rank: int
    world_size: int
    device: torch.device
    timeout_s: float

    @abstractmethod
    def all_to_all(self, send: torch.Tensor, send_counts: Sequence[int], recv_counts: Sequence[int], *,
                   label: str = "") -> torch.Tensor:
        """Variable-size all-to-all of rows.

        Args:
            send: [sum(send_counts), *row] rows grouped by destination rank (rank 0's first).
            send_counts: [G] rows for each rank, this rank included (that share is copied locally).
            recv_counts: [G] rows arriving from each rank; must equal what each peer sends here.
            label: what the exchange is for, for error messages ("layer 3 dispatch").
        Returns:
            [sum(recv_counts), *row] rows grouped by source rank, in the order each source sent them.
        Raises:
            ValueError: counts inconsistent with `send` or not G long.
            CommunicatorError / CommunicatorTimeout: the exchange failed or a peer never arrived.
        """

    @abstractmethod
    def all_gather_ints(self, values: Sequence[int]) -> list[list[int]]:
        """Every rank's `values` (same length on all ranks), indexed by rank. Blocking."""

    @abstractmethod
    def all_reduce_ints(self, values: Sequence[int], op: str = "sum") -> list[int]:
        """Elementwise sum / max / min of every rank's `values` (same length on all ranks). Blocking."""

    @abstractmethod
    def barrier(self) -> None:
        """Returns once every rank has called it."""

    def exchange_counts(self, counts: torch.Tensor, *, label: str = "") -> tuple[list[list[int]], list[list[int]]]:
        """Sends row g of `counts` [G, C] (int64, on `device`) to rank g. Blocking.

        Returns:
            (sent, received): `counts` as host lists, and [G][C] with row s the row rank s sent here.
        """
        if counts.dim() != 2 or counts.shape[0] != self.world_size:
            raise ValueError(f"counts must be [world_size={self.world_size}, C], got {tuple(counts.shape)}")
        ones = [1] * self.world_size
        received = self.all_to_all(counts.contiguous(), ones, ones, label=label)
        both = torch.stack((counts, received)).tolist()
        return both[0], both[1]

    def close(self) -> None:  # noqa: B027 - optional for backends with nothing to release
        """Releases the backend's resources; the communicator is unusable afterwards."""

    # --- helpers for backends --------------------------------------------------------------------

    def _check_all_to_all_args(self, send: torch.Tensor, send_counts: Sequence[int], recv_counts: Sequence[int]):
        g = self.world_size
        if len(send_counts) != g or len(recv_counts) != g:
            raise ValueError(f"send_counts and recv_counts must have world_size={g} entries, "
                             f"got {len(send_counts)} and {len(recv_counts)}")
        if min(send_counts) < 0 or min(recv_counts) < 0:
            raise ValueError(f"counts must be >= 0, got send {list(send_counts)}, recv {list(recv_counts)}")
        if send.dim() == 0 or send.shape[0] != sum(send_counts):
            raise ValueError(f"send must have sum(send_counts)={sum(send_counts)} rows, got shape {tuple(send.shape)}")
        if send.device != self.device:
            raise ValueError(f"send must be on the communicator's device {self.device}, got {send.device}")

    @staticmethod
    def _check_reduce_op(op: str) -> None:
        if op not in REDUCE_OPS:
            raise ValueError(f"op must be one of {REDUCE_OPS}, got {op!r}")


@dataclass(frozen=True)
class CommunicatorSpec:
    """How every rank of one EP group connects: built once by the cluster layer, sent to each rank,
    which calls `create_communicator(spec, rank, device)`.

    Attributes:
        backend: "cupy_nccl" (GPU) or "torch_dist" (gloo on CPU, or torch's nccl). "loopback" lives in one
            process and is made with `LoopbackGroup` instead.
        world_size: G, the ranks in the group.
        timeout_s: deadline of every collective (and of joining, unless join_timeout_s is set).
        join_timeout_s: deadline for every rank to join at init; None: timeout_s.
        nccl_unique_id: cupy_nccl: the 128 bytes from `make_nccl_unique_id()` called on rank 0's process
            (which must stay alive until every rank has connected).
        master_addr, master_port: torch_dist: the rendezvous TCP store's address.
        store_on_rank0: torch_dist: rank 0 hosts that store (else some other process already does).
        torch_backend: torch_dist: "gloo" (CPU tensors) or "nccl" (CUDA tensors).
    """

    backend: str
    world_size: int
    timeout_s: float = 60.0
    join_timeout_s: float | None = None
    nccl_unique_id: bytes = b""
    master_addr: str = ""
    master_port: int = 0
    store_on_rank0: bool = True
    torch_backend: str = "gloo"

    def __post_init__(self) -> None:
        if self.backend not in ("cupy_nccl", "torch_dist"):
            hint = " (loopback is in-process: use parallel.LoopbackGroup)" if self.backend == "loopback" else ""
            raise ValueError(f"backend must be 'cupy_nccl' or 'torch_dist', got {self.backend!r}{hint}")
        if self.world_size <= 0:
            raise ValueError(f"world_size must be > 0, got {self.world_size}")
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s}")
        if self.join_timeout_s is not None and not self.join_timeout_s > 0:
            raise ValueError(f"join_timeout_s must be None or > 0, got {self.join_timeout_s}")
        if self.backend == "cupy_nccl" and len(self.nccl_unique_id) != 128:
            raise ValueError(f"nccl_unique_id must be the 128 bytes of make_nccl_unique_id(), "
                             f"got {len(self.nccl_unique_id)} bytes")
        if self.backend == "torch_dist":
            if not self.master_addr or not 0 < self.master_port < 65536:
                raise ValueError(f"master_addr and master_port (1..65535) must be set for torch_dist, "
                                 f"got {self.master_addr!r}:{self.master_port}")
            if self.torch_backend not in ("gloo", "nccl"):
                raise ValueError(f"torch_backend must be 'gloo' or 'nccl', got {self.torch_backend!r}")


def resolve_cuda_device(device: str | torch.device | None) -> torch.device:
    """`device` as "cuda:i" (None or a bare "cuda" mean the current CUDA device), as tensors report it."""
    device = torch.device("cuda") if device is None else torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"device must be a CUDA device, got {device}")
    return device if device.index is not None else torch.device("cuda", torch.cuda.current_device())


def create_communicator(spec: CommunicatorSpec, rank: int, device: str | torch.device | None = None) -> Communicator:
    """Joins the EP group described by `spec` as `rank`; blocks until every rank has joined.

    Args:
        device: cupy_nccl / torch's nccl: the rank's GPU (default: the current CUDA device);
            gloo: ignored (CPU).
    Raises:
        CommunicatorTimeout: some rank did not join within `spec.join_timeout_s` (default `spec.timeout_s`).
    """
    if not 0 <= rank < spec.world_size:
        raise ValueError(f"rank must be in [0, {spec.world_size}), got {rank}")
    if spec.backend == "cupy_nccl":
        from parallel.cupy_nccl import CupyNcclCommunicator

        return CupyNcclCommunicator(rank, spec.world_size, spec.nccl_unique_id, spec.timeout_s, device,
                                    join_timeout_s=spec.join_timeout_s)
    from parallel.torch_dist import TorchDistCommunicator

    return TorchDistCommunicator(rank, spec.world_size, spec.master_addr, spec.master_port, spec.timeout_s,
                                 backend=spec.torch_backend, device=device, host_store=spec.store_on_rank0 and rank == 0,
                                 join_timeout_s=spec.join_timeout_s)
