"""The token dispatcher: moves each token to the ranks holding its experts and the results back.

Per MoE layer, on every rank (a rank with zero tokens included):
1. route: each (token, slot) -> (rank, local expert) through the placement's routing table;
2. count, per destination rank, the rows (one per token and destination RANK, not per expert) and the
   (token, expert) pairs of each of its local experts, and exchange these counts: the only host sync;
3. dispatch: one all-to-all of rows [hidden | k local ids | k weights]; a token whose top-k experts sit on
   one rank travels once, with the slots held elsewhere marked -1;
4. the receiver expands rows into (row, slot) pairs, sorts them by local expert and returns the expert
   inputs grouped per expert; the rank runs its experts;
5. combine: the receiver sums w_e * y_e of each row in float32 (one row back per row received), one
   all-to-all returns them, and the source adds them up per token in float32, like `Experts.forward`.
Activations travel in the model's dtype; the router weights travel as float32 bits inside the row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from parallel.comm import Communicator
from parallel.placement import ExpertPlacement

# Per row, the metadata after the hidden state: k local expert ids then k router weights, all float32
# (ids are small integers, exact in float32; -1 marks a slot whose expert is on another rank).
_META_DTYPE = torch.float32


class ExpertLoad:
    """Tokens routed to each expert in each layer, counted on the routing rank (on its device, no sync).

    The sum over the ranks of a group is the group's expert load (what a load-based placement needs).
    """

    def __init__(self, num_layers: int, num_experts: int, device: str | torch.device = "cpu"):
        self.counts = torch.zeros(num_layers, num_experts, dtype=torch.int64, device=device)  # [L, E]

    def add(self, layer: int, topk_ids: torch.Tensor) -> None:
        """Counts the experts of `topk_ids` [T, k] (global ids) for `layer`."""
        flat = topk_ids.flatten()
        # index_add_, not bincount: bincount on CUDA syncs with the host to size its output.
        self.counts[layer].index_add_(0, flat, torch.ones_like(flat))

    def get_counts(self) -> torch.Tensor:
        """[L, E] int64 on the CPU, a copy."""
        return self.counts.cpu().clone()

    def take_counts(self) -> torch.Tensor:
        """[L, E] int64 on the CPU; the counters restart from zero."""
        counts = self.get_counts()
        self.counts.zero_()
        return counts


@dataclass
class DispatchHandle:
    """What `combine` needs to bring the results of one `dispatch` home. Opaque to callers."""

    row_token_ids: torch.Tensor  # [N] source token of each row sent, rows grouped by destination rank
    send_counts: list[int]  # [G] rows sent to each rank
    recv_counts: list[int]  # [G] rows received from each rank
    pair_row_ids: torch.Tensor  # [P] received row of each expert-input row
    pair_weights: torch.Tensor  # [P] float32 router weight of each expert-input row
    num_tokens: int
    dtype: torch.dtype
    label: str


class TokenDispatcher:
    """Dispatch and combine for one MoE layer on one rank.

    Args:
        communicator: the rank's end of the EP group.
        placement: experts per rank; this rank must hold `placement.expert_ids(communicator.rank)`, in order.
        layer: the layer index (for the load counters and error messages).
        load: counters to count this layer's routed tokens into (None: no counting).
    """

    def __init__(self, communicator: Communicator, placement: ExpertPlacement, *, layer: int = 0,
                 load: ExpertLoad | None = None):
        if placement.world_size != communicator.world_size:
            raise ValueError(f"placement.world_size must equal the communicator's world_size "
                             f"({communicator.world_size}), got {placement.world_size}")
        self.comm, self.placement, self.layer, self.load = communicator, placement, layer, load
        device = communicator.device
        expert_to_rank, expert_to_local = placement.routing_table(communicator.rank)
        self._expert_to_rank = torch.tensor(expert_to_rank, dtype=torch.int64, device=device)  # [E]
        self._expert_to_local = torch.tensor(expert_to_local, dtype=torch.int64, device=device)  # [E]
        self.num_local_experts = len(placement.expert_ids(communicator.rank))
        self._count_width = 1 + placement.max_experts_per_rank

    def dispatch(self, hidden: torch.Tensor, topk_ids: torch.Tensor,
                 topk_weights: torch.Tensor) -> tuple[torch.Tensor, list[int], DispatchHandle]:
        """Sends this rank's tokens to their experts' ranks and gathers the tokens for its own experts.

        Args:
            hidden: [T, H] this rank's tokens (T may be 0), in the model dtype.
            topk_ids: [T, k] global expert ids from the router.
            topk_weights: [T, k] router weights.
        Returns:
            expert_in: [P, H] the rows for this rank's experts, grouped by local expert (ascending).
            expert_counts: [num_local_experts] rows of each local expert in `expert_in`.
            handle: for `combine`.
        """
        t, k = topk_ids.shape
        if hidden.dim() != 2 or hidden.shape[0] != t or topk_weights.shape != topk_ids.shape:
            raise ValueError(f"hidden must be [T, H] and topk_weights [T, k] like topk_ids {tuple(topk_ids.shape)}, "
                             f"got {tuple(hidden.shape)} and {tuple(topk_weights.shape)}")
        label = f"layer {self.layer}"
        if self.load is not None:
            self.load.add(self.layer, topk_ids)
        dest_rank, dest_local, to_rank, counts = self._route(topk_ids)
        sent, received = self.comm.exchange_counts(counts, label=f"{label} counts")
        send_counts, recv_counts = [c[0] for c in sent], [c[0] for c in received]
        expert_counts = [sum(c[1 + e] for c in received) for e in range(self._count_width - 1)]
        assert not any(expert_counts[self.num_local_experts:]), f"rows for experts this rank lacks: {expert_counts}"
        expert_counts = expert_counts[: self.num_local_experts]

        rows, row_token = self._pack(hidden, topk_weights, dest_rank, dest_local, to_rank, sum(send_counts))
        recv = self.comm.all_to_all(rows, send_counts, recv_counts, label=f"{label} dispatch")  # [M, H + meta]
        h = hidden.shape[1]
        pair_row, pair_weights = self._unpack(recv[:, h:], k, sum(expert_counts))
        handle = DispatchHandle(row_token, send_counts, recv_counts, pair_row, pair_weights, t, hidden.dtype, label)
        return recv[:, :h].index_select(0, pair_row), expert_counts, handle

    # index_select rather than tensor[index] in what follows: several times faster on CPU.

    def _route(self, topk_ids: torch.Tensor):
        """The destination of each (token, slot) and what goes to each rank.

        Returns:
            dest_rank, dest_local: [T, k] rank and local expert id of each slot.
            to_rank: [T, G] bool, the token has a row for that rank.
            counts: [G, 1 + max local experts]: per rank, the rows, then the (token, expert) pairs of each of
                its local experts.
        """
        t, k = topk_ids.shape
        g, width, device = self.comm.world_size, self._count_width, topk_ids.device
        flat_ids = topk_ids.flatten()
        dest_rank = self._expert_to_rank.index_select(0, flat_ids).view(t, k)
        dest_local = self._expert_to_local.index_select(0, flat_ids).view(t, k)
        to_rank = torch.zeros(t, g, dtype=torch.bool, device=device).scatter_(1, dest_rank, True)
        counts = torch.zeros(g, width, dtype=torch.int64, device=device)
        counts[:, 0] = to_rank.sum(0)
        pair_slots = (dest_rank * width + 1 + dest_local).flatten()
        counts.view(-1).index_add_(0, pair_slots, torch.ones_like(pair_slots))
        return dest_rank, dest_local, to_rank, counts

    @staticmethod
    def _pack(hidden, topk_weights, dest_rank, dest_local, to_rank, num_rows: int):
        """The send buffer: one row per (token, destination rank), grouped by rank, each row
        [hidden | k local ids | k weights] (the float32 metadata bit-cast to the model dtype's columns).

        Returns:
            rows: [N, H + meta columns]; row_token: [N] the token of each row.
        """
        # nonzero_static: the size is known from the counts, so no device sync here.
        row_rank, row_token = torch.nonzero_static(to_rank.t(), size=num_rows).unbind(1)  # [N]
        here = dest_rank.index_select(0, row_token) == row_rank[:, None]  # [N, k] slots on the row's rank
        meta = torch.cat((torch.where(here, dest_local.index_select(0, row_token), -1).to(_META_DTYPE),
                          torch.where(here, topk_weights.index_select(0, row_token).to(_META_DTYPE), 0.0)), dim=1)
        meta = meta.view(hidden.dtype)
        h = hidden.shape[1]
        rows = hidden.new_empty(num_rows, h + meta.shape[1])
        torch.index_select(hidden, 0, row_token, out=rows[:, :h])  # one pass, straight into the send buffer
        rows[:, h:] = meta
        return rows, row_token

    @staticmethod
    def _unpack(recv_meta: torch.Tensor, k: int, num_pairs: int):
        """The (row, slot) pairs for this rank's experts, sorted by local expert (stable: by row within one).

        Args:
            recv_meta: [M, meta columns] the metadata columns of the rows received.
        Returns:
            pair_row: [P] the received row of each pair; pair_weights: [P] float32.
        """
        meta = recv_meta.contiguous().view(_META_DTYPE)  # [M, 2k]
        local = meta[:, :k].to(torch.int64)  # -1: that slot's expert is on another rank
        pair_row, pair_slot = torch.nonzero_static(local >= 0, size=num_pairs).unbind(1)  # [P]
        order = torch.argsort(local[pair_row, pair_slot], stable=True)
        pair_weights = meta[pair_row, k + pair_slot].index_select(0, order)
        return pair_row.index_select(0, order), pair_weights

    def combine(self, expert_out: torch.Tensor, handle: DispatchHandle) -> torch.Tensor:
        """Brings the expert results home and sums them per token with the router weights.

        Args:
            expert_out: [P, H] the experts' outputs, row for row of `dispatch`'s `expert_in`.
            handle: from the `dispatch` of the same layer and step.
        Returns:
            [T, H] in the model dtype: sum over the token's k experts of w_e * y_e, accumulated in float32.
        """
        if expert_out.dim() != 2 or expert_out.shape[0] != handle.pair_row_ids.shape[0]:
            raise ValueError(f"expert_out must be [{handle.pair_row_ids.shape[0]}, H] like dispatch's expert_in, "
                             f"got {tuple(expert_out.shape)}")
        h, device = expert_out.shape[1], expert_out.device
        weighted = expert_out * handle.pair_weights[:, None] if expert_out.dtype == torch.float32 else \
            expert_out.float().mul_(handle.pair_weights[:, None])  # faster than a mixed-dtype multiply on CPU
        rows = torch.zeros(sum(handle.recv_counts), h, dtype=torch.float32, device=device)
        rows.index_add_(0, handle.pair_row_ids, weighted)  # [M, H] one partial sum per row received
        back = self.comm.all_to_all(rows.to(handle.dtype), handle.recv_counts, handle.send_counts,
                                    label=f"{handle.label} combine")  # [N, H]
        out = torch.zeros(handle.num_tokens, h, dtype=torch.float32, device=device)
        out.index_add_(0, handle.row_token_ids, back.float())
        return out.to(handle.dtype)
