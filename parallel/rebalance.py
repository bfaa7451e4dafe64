"""Online expert rearrangement: an EP model moves to new per-layer placements between two steps.

Every rank of the group calls `ExpertRebalancer.rearrange` at the same point of its loop (the cluster
layer agrees when, as it agrees each step). It

1. sums every rank's routed-token counts over the window (one all-reduce) and plans each layer with the
   EPLB planner (parallel/eplb.py); a layer whose plan would not lower its busiest rank's expected load
   by `min_gain` keeps its placement (no churn for noise);
2. then, one changed layer at a time: each rank gets the experts it newly holds, read from the
   memory-mapped checkpoint ("checkpoint") or sent by the lowest rank that held them before
   ("communicator": one all-to-all of byte rows); the ranks agree that every one got its experts (one
   all-reduce), and each swaps in the layer's new experts and dispatcher. A rank that could not read
   its experts makes every rank keep that layer as it was (reported, nothing else changes).

Nothing runs between the start and the end of a rearrangement on any rank, so no step ever sees two
placements. A rank's kept experts keep their slots (`keep_slots`), so a move writes only the new ones,
in place; only where a rank's number of experts changes (the planner dropped a copy) is the layer's set
built anew, holding that layer's share twice for a moment: `transient_bytes`, for the load's memory check.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from gptoss.model import Experts, Transformer
from parallel import eplb
from parallel.comm import Communicator, CommunicatorError
from parallel.dispatcher import ExpertTokenCounts, TokenDispatcher
from parallel.moe import ExpertParallelMoE, assemble_experts
from parallel.placement import ExpertPlacement

logger = logging.getLogger(__name__)

TRANSFERS = ("checkpoint", "communicator")

# Experts' weights by `Experts` buffer name for the ids asked, in that order ([n, ...] each).
ReadExperts = Callable[[int, list[int]], dict[str, torch.Tensor]]


@dataclass(frozen=True)
class Rearrangement:
    """What one `rearrange` did (the same plan on every rank; times and moves are this rank's)."""

    changed_layers: tuple[int, ...]
    imbalance_before: tuple[float, ...]  # per layer: busiest rank / mean under the placements before
    imbalance_after: tuple[float, ...]  # the same under the placements after (a kept layer: as before)
    num_experts_fetched: int  # experts this rank newly holds, all layers together
    fetch_s: float  # this rank's time reading or receiving them
    pause_s: float  # this rank's whole time in `rearrange`
    transfer: str
    error: str = ""  # why some layer kept its placement (a rank could not read its experts)


class WindowCounts:
    """Routed tokens per expert over about the last `window_steps` steps, from the cumulative counters
    of `ExpertTokenCounts` (snapshots on the device every window/4 steps: no host sync per step)."""

    def __init__(self, counts: ExpertTokenCounts, window_steps: int):
        if window_steps < 1:
            raise ValueError(f"window_steps must be >= 1, got {window_steps}")
        self.counts, self.window_steps = counts, window_steps
        self._period = max(1, window_steps // 4)
        self._snapshots: deque[tuple[int, torch.Tensor]] = deque()

    def step_done(self, num_steps: int) -> None:
        """Call after every step with the group's step count (the same on every rank)."""
        if num_steps % self._period:
            return
        self._snapshots.append((num_steps, self.counts.counts.clone()))
        while len(self._snapshots) > 1 and self._snapshots[1][0] <= num_steps - self.window_steps:
            self._snapshots.popleft()

    def window(self) -> torch.Tensor:
        """[L, E] int64 on the counters' device: tokens since the oldest snapshot kept (since the start
        while the first window fills)."""
        now = self.counts.counts
        return now - self._snapshots[0][1] if self._snapshots else now.clone()


class ExpertRebalancer:
    """Holds an expert-parallel model's per-layer placements and moves it to better ones (see the module).

    Args:
        model: made expert-parallel by `apply_expert_parallel` with `placements`.
        communicator: the rank's end of the group.
        placements: the model's placement of each layer (the same on every rank).
        redundant_per_rank: R, expert slots per rank beyond E/G, in every layer.
        read_experts: (layer, expert ids) -> their weights from the checkpoint
            (`gptoss.load.read_experts` bound to a reader); needed for transfer="checkpoint".
        transfer: "checkpoint" or "communicator" (see the module).
        node_key: an int naming this rank's node (ranks of one node pass the same): copies stay in-node.
        min_gain: a layer moves only if its busiest rank's expected load drops by this share.
    """

    def __init__(self, model: Transformer, communicator: Communicator, placements: Sequence[ExpertPlacement], *,
                 redundant_per_rank: int, read_experts: ReadExperts | None = None, transfer: str = "checkpoint",
                 node_key: int = 0, min_gain: float = 0.02):
        if transfer not in TRANSFERS:
            raise ValueError(f"transfer must be one of {TRANSFERS}, got {transfer!r}")
        if transfer == "checkpoint" and read_experts is None:
            raise ValueError("transfer='checkpoint' needs read_experts")
        if len(placements) != model.config.num_hidden_layers:
            raise ValueError(f"placements must give each of the {model.config.num_hidden_layers} layers, "
                             f"got {len(placements)}")
        for layer, block in enumerate(model.layers):
            if not isinstance(block.mlp, ExpertParallelMoE):
                raise ValueError(f"layer {layer} is not expert-parallel: apply_expert_parallel first")
        self.model, self.comm = model, communicator
        self.placements = list(placements)
        self.redundant_per_rank, self.read_experts, self.transfer = redundant_per_rank, read_experts, transfer
        self.node_key, self.min_gain = node_key, min_gain
        self._node_of_rank: list[int] | None = None

    def transient_bytes(self) -> int:
        """The most memory a rearrangement holds beyond the model and the new experts' bytes: one layer's
        share of experts, where a move changes a rank's count of experts (else it writes in place)."""
        return max(_experts_nbytes(block.mlp.experts) for block in self.model.layers)

    def rearrange(self, counts: torch.Tensor) -> Rearrangement:
        """Plans from this rank's `counts` [L, E] (summed over the group here) and moves every layer that
        gains. A collective: every rank calls it at the same point. Raises CommunicatorError when the
        group broke meanwhile (like any step)."""
        started = time.perf_counter()
        g, rank = self.comm.world_size, self.comm.rank
        if self._node_of_rank is None:
            self._node_of_rank = [row[0] for row in self.comm.all_gather_ints([self.node_key])]
        num_layers, num_experts = counts.shape
        total = self.comm.all_reduce_ints(counts.flatten().tolist(), "sum")
        group_counts = [total[layer * num_experts:(layer + 1) * num_experts] for layer in range(num_layers)]
        plans = eplb.plan(group_counts, g, self.redundant_per_rank, self._node_of_rank, current=self.placements)
        changed, after, errors = [], [], []
        fetched_total, fetch_s = 0, 0.0
        for layer, planned in enumerate(plans):
            gains = planned.imbalance_after < planned.imbalance_before * (1 - self.min_gain)
            placement = keep_slots(self.placements[layer], planned.placement)
            if not gains or placement == self.placements[layer]:
                after.append(planned.imbalance_before)
                continue
            fetch_started = time.perf_counter()
            fetched, error = self._fetch(layer, self.placements[layer], placement)
            fetch_s += time.perf_counter() - fetch_started
            # Every rank swaps this layer, or none does.
            if self.comm.all_reduce_ints([int(bool(error))], "max")[0]:
                errors.append(f"layer {layer}: {error or 'another rank could not read its experts'}")
                after.append(planned.imbalance_before)
                continue
            self._swap(layer, placement, fetched)
            fetched_total += len(fetched)
            changed.append(layer)
            after.append(planned.imbalance_after)
        result = Rearrangement(tuple(changed), tuple(p.imbalance_before for p in plans), tuple(after), fetched_total,
                               fetch_s, time.perf_counter() - started, self.transfer, "; ".join(errors))
        if rank == 0:
            logger.info("EPLB: moved %d of %d layers in %.3f s (%s); imbalance %.3f -> %.3f (worst layer)%s",
                        len(changed), num_layers, result.pause_s, self.transfer, max(result.imbalance_before),
                        max(result.imbalance_after), f"; kept: {result.error}" if errors else "")
        return result

    # --- one layer ---------------------------------------------------------------------------------

    def _fetch(self, layer: int, old: ExpertPlacement, new: ExpertPlacement
               ) -> tuple[dict[int, dict[str, torch.Tensor]], str]:
        """The weights of the experts this rank holds in `new` but not in `old`, and an error message
        ("" when it has them all). The communicator's failures are the group's: they raise."""
        if self.transfer == "communicator":
            return self._receive(layer, old, new), ""
        rank = self.comm.rank
        wanted = [e for e in new.rank_expert_ids[rank] if e not in old.rank_expert_ids[rank]]
        if not wanted:
            return {}, ""
        try:
            weights = self.read_experts(layer, wanted)
        except CommunicatorError:
            raise
        except Exception as e:  # a checkpoint gone or unreadable: this layer stays as it is
            logger.error("EPLB: rank %d could not read experts %s of layer %d: %s", rank, wanted, layer, e)
            return {}, f"rank {rank} could not read experts {wanted}: {type(e).__name__}: {e}"
        return {e: {name: w[i] for name, w in weights.items()} for i, e in enumerate(wanted)}, ""

    def _receive(self, layer: int, old: ExpertPlacement, new: ExpertPlacement) -> dict[int, dict[str, torch.Tensor]]:
        """Each expert a rank newly holds comes from the lowest rank that held it before, as one row of
        bytes (every buffer of that expert, one after another) in one all-to-all."""
        g, rank = self.comm.world_size, self.comm.rank
        source = {e: min(r for r, _ in old.replicas(e)) for e in range(old.num_experts)}
        wanted = [[e for e in new.rank_expert_ids[d] if e not in old.rank_expert_ids[d]] for d in range(g)]
        experts = self.model.layers[layer].mlp.experts
        buffers = _weight_buffers(experts)
        row_bytes = sum(_row_nbytes(b) for b in buffers.values())
        sends = [[e for e in wanted[d] if source[e] == rank] for d in range(g)]
        rows = [torch.cat([buffers[name][experts.expert_ids.index(e)].reshape(-1).view(torch.uint8)
                           for name in buffers]) for d in range(g) for e in sends[d]]
        send = torch.stack(rows) if rows else torch.empty(0, row_bytes, dtype=torch.uint8, device=self.comm.device)
        recv_counts = [sum(source[e] == s for e in wanted[rank]) for s in range(g)]
        received = self.comm.all_to_all(send, [len(s) for s in sends], recv_counts, label=f"layer {layer} experts")
        arrival = [e for s in range(g) for e in wanted[rank] if source[e] == s]  # grouped by source rank
        out = {}
        for row, expert in zip(received, arrival, strict=True):
            weights, at = {}, 0
            for name, buffer in buffers.items():
                n = _row_nbytes(buffer)
                weights[name] = row[at:at + n].clone().view(buffer.dtype).view(buffer.shape[1:])  # clone: aligned
                at += n
            out[expert] = weights
        return out

    def _swap(self, layer: int, placement: ExpertPlacement, fetched: dict[int, dict[str, torch.Tensor]]) -> None:
        block = self.model.layers[layer]
        old = block.mlp
        old_ids, new_ids = old.experts.expert_ids, placement.expert_ids(self.comm.rank)
        if len(new_ids) == len(old_ids):  # kept experts kept their slots (keep_slots): write the new ones over
            experts = replace_in_place(old.experts, new_ids, self.model.config, fetched)
        else:  # a rank with fewer or more slots than before: a new set, built whole
            experts = assemble_experts(old.experts, new_ids, self.model.config, fetched)
        dispatcher = TokenDispatcher(self.comm, placement, layer=layer,
                                     expert_token_counts=old.dispatcher.expert_token_counts)
        block.mlp = ExpertParallelMoE(old.router, experts, dispatcher)
        self.placements[layer] = placement


def replace_in_place(experts: Experts, expert_ids: list[int], config, fetched: dict[int, dict[str, torch.Tensor]]
                     ) -> Experts:
    """`experts` now holding `expert_ids` (as many as before): each slot whose expert changed gets its
    new expert's weights from `fetched`, written over the old ones; the other slots are not touched."""
    buffers = _weight_buffers(experts)
    for slot, (before, now) in enumerate(zip(experts.expert_ids, expert_ids, strict=True)):
        if before != now:
            for name, buffer in buffers.items():
                buffer[slot].copy_(fetched[now][name])
    experts.expert_ids = list(expert_ids)
    experts.global_to_local = experts.global_to_local_table(config).to(experts.global_to_local.device)
    experts._float32_biases.clear()  # float32 copies of the biases just written
    return experts


def _weight_buffers(experts: Experts) -> dict[str, torch.Tensor]:
    return {name: b for name, b in experts.named_buffers(recurse=False) if name != "global_to_local"}


def _row_nbytes(buffer: torch.Tensor) -> int:
    return buffer[0].numel() * buffer.element_size()


def _experts_nbytes(experts: Experts) -> int:
    return sum(b.nbytes for b in _weight_buffers(experts).values())


def keep_slots(current: ExpertPlacement, planned: ExpertPlacement) -> ExpertPlacement:
    """`planned` with each rank's experts ordered so that an expert the rank keeps stays in its slot (its
    local id) and a new one takes a slot that was freed: a move then writes only the new experts, in
    place, and leaves the kept ones where they are."""
    ranks = []
    for before, after in zip(current.rank_expert_ids, planned.rank_expert_ids, strict=True):
        staying = set(after)
        newcomers = iter([e for e in after if e not in before])
        slots = [e if e in staying else next(newcomers, None) for e in before]
        ranks.append(tuple(e for e in slots if e is not None) + tuple(newcomers))
    return ExpertPlacement(planned.num_experts, tuple(ranks))


def max_redundant_per_rank(num_experts: int, world_size: int) -> int:
    """The most redundant slots a rank can fill: one copy of each expert the other ranks hold."""
    return (world_size - 1) * (num_experts // world_size)


def initial_placement(num_experts: int, world_size: int, redundant_per_rank: int) -> ExpertPlacement:
    """Where a group with R redundant slots per rank starts, before anything is measured: the contiguous
    placement, each rank's extra slots holding copies of the following ranks' first experts (every rank
    then holds E/G + R experts from the start, so the memory of the copies is taken and checked at load)."""
    base = ExpertPlacement.contiguous(num_experts, world_size)
    most = max_redundant_per_rank(num_experts, world_size)
    if redundant_per_rank > most:
        raise ValueError(f"redundant_per_rank must be at most {most} (the experts held by other ranks), "
                         f"got {redundant_per_rank}")
    ids = []
    for rank, own in enumerate(base.rank_expert_ids):
        others = [e for r in range(1, world_size) for e in base.rank_expert_ids[(rank + r) % world_size]]
        ids.append(tuple(own) + tuple(others[:redundant_per_rank]))
    return ExpertPlacement(num_experts, tuple(ids))
