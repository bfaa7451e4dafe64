"""The token dispatcher: moves each token to the ranks holding its experts and the results back.

Per MoE layer, on every rank (a rank with zero tokens included):
1. route: each (token, slot) -> (rank, local expert) through the placement's routing table (an expert
   with copies elsewhere: one copy per token, by its position, so the copies share its tokens evenly);
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


class ExpertTokenCounts:
    """Tokens routed to each expert in each layer, counted on the routing rank (on its device, no sync).

    The sum over the ranks of a group is the group's `expert_token_counts` (what a placement balanced by
    measured traffic would need).
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
    """What `combine` needs to bring the results of one `dispatch` home. Opaque to callers.

    Both weighted sums are split the same way: every received row has at least one local pair and every
    token at least one row, so each sum starts as a plain (weighted) copy of its first term, and only the
    remaining terms are scatter-added (no zero-filled accumulator, fewer scattered rows).
    """

    send_counts: list[int]  # [G] rows sent to each rank
    recv_counts: list[int]  # [G] rows received from each rank
    first_pair_ids: torch.Tensor  # [M] expert-input row of each received row's first pair
    first_weights: torch.Tensor  # [M, 1] float32 router weight of that pair
    rest_pair_ids: torch.Tensor  # [P - M] expert-input row of each other pair
    rest_row_ids: torch.Tensor  # [P - M] its received row
    rest_weights: torch.Tensor  # [P - M, 1] float32
    token_first_row_ids: torch.Tensor  # [T] row sent (rows grouped by rank) holding each token's first copy
    rest_sent_row_ids: torch.Tensor  # [N - T] the other rows sent
    rest_token_ids: torch.Tensor  # [N - T] their tokens
    num_pairs: int  # P, the rows of expert_in
    dtype: torch.dtype
    label: str


class TokenDispatcher:
    """Dispatch and combine for one MoE layer on one rank.

    Args:
        communicator: the rank's end of the EP group.
        placement: experts per rank; this rank must hold `placement.expert_ids(communicator.rank)`, in order.
        layer: the layer index (for the token counters and error messages).
        expert_token_counts: counters to count this layer's routed tokens into (None: no counting).
    """

    def __init__(self, communicator: Communicator, placement: ExpertPlacement, *, layer: int = 0,
                 expert_token_counts: ExpertTokenCounts | None = None):
        if placement.world_size != communicator.world_size:
            raise ValueError(f"placement.world_size must equal the communicator's world_size "
                             f"({communicator.world_size}), got {placement.world_size}")
        self.comm, self.placement, self.layer = communicator, placement, layer
        self.expert_token_counts = expert_token_counts
        device = communicator.device
        table = placement.routing_table(communicator.rank)
        width = max(len(copies) for copies in table)
        padded = [copies + copies[:1] * (width - len(copies)) for copies in table]
        self._copy_width = width
        self._copy_rank = torch.tensor([[r for r, _ in c] for c in padded], dtype=torch.int64, device=device)  # [E, C]
        self._copy_local = torch.tensor([[i for _, i in c] for c in padded], dtype=torch.int64, device=device)
        self._num_copies = torch.tensor([len(c) for c in table], dtype=torch.int64, device=device)  # [E]
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
        if self.expert_token_counts is not None:
            self.expert_token_counts.add(self.layer, topk_ids)
        dest_rank, dest_local, to_rank, counts = self._route(topk_ids)
        sent, received = self.comm.exchange_counts(counts, label=f"{label} counts")
        send_counts, recv_counts = [c[0] for c in sent], [c[0] for c in received]
        expert_counts = [sum(c[1 + e] for c in received) for e in range(self._count_width - 1)]
        assert not any(expert_counts[self.num_local_experts:]), f"rows for experts this rank lacks: {expert_counts}"
        expert_counts = expert_counts[: self.num_local_experts]

        num_sent = sum(send_counts)
        rows, row_token, row_rank = self._pack(hidden, topk_weights, dest_rank, dest_local, to_rank, num_sent)
        recv = self.comm.all_to_all(rows, send_counts, recv_counts, label=f"{label} dispatch")  # [M, H + meta]
        h = hidden.shape[1]
        pair_row, first, rest = self._unpack(recv[:, h:], k, sum(expert_counts))
        token_first, rest_sent, rest_token = self._sent_rows_per_token(to_rank, row_token, row_rank)
        handle = DispatchHandle(send_counts, recv_counts, *first, *rest, token_first, rest_sent, rest_token,
                                pair_row.shape[0], hidden.dtype, label)
        return recv[:, :h].index_select(0, pair_row), expert_counts, handle

    # index_select rather than tensor[index] in what follows: several times faster on CPU. Sizes of
    # nonzero_static are known from the counts, so nothing here syncs a GPU with the host.

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
        slot = flat_ids
        if self._copy_width > 1:
            # An expert with several copies: token i's slot goes to copy (i + this rank) mod copies, so
            # the copies share its tokens evenly and deterministically (one copy each: nothing to pick).
            position = torch.arange(t, device=device).repeat_interleave(k) + self.comm.rank
            slot = flat_ids * self._copy_width + position % self._num_copies.index_select(0, flat_ids)
        dest_rank = self._copy_rank.view(-1).index_select(0, slot).view(t, k)
        dest_local = self._copy_local.view(-1).index_select(0, slot).view(t, k)
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
            rows: [N, H + meta columns]; row_token, row_rank: [N] the token and destination of each row.
        """
        row_rank, row_token = torch.nonzero_static(to_rank.t(), size=num_rows).unbind(1)  # [N]
        k, h = dest_rank.shape[1], hidden.shape[1]
        here = dest_rank.index_select(0, row_token) == row_rank[:, None]  # [N, k] slots on the row's rank
        rows = hidden.new_empty(num_rows, h + 2 * k * 4 // hidden.element_size())
        meta = rows[:, h:].view(_META_DTYPE)  # [N, 2k], written in place: no metadata copy
        local = dest_local.to(_META_DTYPE).index_select(0, row_token)  # [N, k]
        meta[:, :k] = local.masked_fill_(~here, -1.0)
        # The weights of slots held elsewhere travel too (the receiver skips them): no masking pass.
        torch.index_select(topk_weights.to(_META_DTYPE), 0, row_token, out=meta[:, k:])
        torch.index_select(hidden, 0, row_token, out=rows[:, :h])  # one pass, straight into the send buffer
        return rows, row_token, row_rank

    @staticmethod
    def _unpack(recv_meta: torch.Tensor, k: int, num_pairs: int):
        """The (row, slot) pairs for this rank's experts, sorted by local expert (stable: by row within one),
        and how each received row's weighted sum is made of them.

        Args:
            recv_meta: [M, meta columns] the metadata columns of the rows received.
        Returns:
            pair_row: [P] the received row of each pair, in expert order;
            first: ([M] each row's first pair in expert order, [M, 1] its weight);
            rest: ([P - M] the other pairs in expert order, [P - M] their rows, [P - M, 1] their weights).
        """
        num_rows = recv_meta.shape[0]
        meta = recv_meta.contiguous().view(_META_DTYPE)  # [M, 2k]
        local = meta[:, :k].to(torch.int64)  # -1: that slot's expert is on another rank
        row, slot = torch.nonzero_static(local >= 0, size=num_pairs).unbind(1)  # [P] in (row, slot) order
        order = torch.argsort(local[row, slot], stable=True)  # expert order -> (row, slot) order
        pair_row = row.index_select(0, order)
        position = torch.empty_like(order).index_copy_(0, order, torch.arange(num_pairs, device=order.device))
        weights = meta[row, k + slot][:, None]  # [P, 1] in (row, slot) order
        # Every row received has >= 1 local pair: in (row, slot) order its first one starts each row.
        is_first = torch.ones(num_pairs, dtype=torch.bool, device=row.device)
        is_first[1:] = row[1:] != row[:-1]
        first_ids = torch.nonzero_static(is_first, size=num_rows).flatten()  # [M], row i's first pair
        rest_ids = torch.nonzero_static(~is_first, size=num_pairs - num_rows).flatten()
        first = (position.index_select(0, first_ids), weights.index_select(0, first_ids))
        rest = (position.index_select(0, rest_ids), row.index_select(0, rest_ids), weights.index_select(0, rest_ids))
        return pair_row, first, rest

    @staticmethod
    def _sent_rows_per_token(to_rank: torch.Tensor, row_token: torch.Tensor, row_rank: torch.Tensor):
        """Each token's first row sent (at its lowest destination rank) and the other rows with their tokens.

        Returns:
            token_first: [T]; rest_sent, rest_token: [N - T].
        """
        t, n = to_rank.shape[0], row_token.shape[0]
        ranks_so_far = to_rank.cumsum(1)  # [T, G]: a row is its token's first iff this is 1 at its rank
        is_first = ranks_so_far[row_token, row_rank] == 1  # [N]
        first_ids = torch.nonzero_static(is_first, size=t).flatten()
        rest_ids = torch.nonzero_static(~is_first, size=n - t).flatten()
        token_first = torch.empty_like(first_ids).index_copy_(0, row_token.index_select(0, first_ids), first_ids)
        return token_first, rest_ids, row_token.index_select(0, rest_ids)

    def combine(self, expert_out: torch.Tensor, handle: DispatchHandle) -> torch.Tensor:
        """Brings the expert results home and sums them per token with the router weights.

        Args:
            expert_out: [P, H] the experts' outputs, row for row of `dispatch`'s `expert_in`.
            handle: from the `dispatch` of the same layer and step.
        Returns:
            [T, H] in the model dtype: sum over the token's k experts of w_e * y_e, accumulated in float32.
        """
        if expert_out.dim() != 2 or expert_out.shape[0] != handle.num_pairs:
            raise ValueError(f"expert_out must be [{handle.num_pairs}, H] like dispatch's expert_in, "
                             f"got {tuple(expert_out.shape)}")
        # [M, H] float32: one partial sum per row received (gather, then up-cast and weigh in place).
        rows = _weighted_rows(expert_out, handle.first_pair_ids, handle.first_weights)
        rows.index_add_(0, handle.rest_row_ids, _weighted_rows(expert_out, handle.rest_pair_ids, handle.rest_weights))
        back = self.comm.all_to_all(rows.to(handle.dtype), handle.recv_counts, handle.send_counts,
                                    label=f"{handle.label} combine")  # [N, H]
        out = back.index_select(0, handle.token_first_row_ids).float()  # [T, H]
        out.index_add_(0, handle.rest_token_ids, back.index_select(0, handle.rest_sent_row_ids).float())
        return out.to(handle.dtype)


def _weighted_rows(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """float32 `x[ids] * weights` ([n, H] * [n, 1]): the up-cast makes the one new tensor, the multiply
    runs in place (faster on CPU than a mixed-dtype multiply)."""
    picked = x.index_select(0, ids)
    return picked.float().mul_(weights) if picked.dtype != torch.float32 else picked.mul_(weights)
