"""Expert load balancing (EPLB): from measured tokens per expert, choose which experts get extra copies
and where every copy lives, so that the busiest rank of an EP group carries as little as it can.

In an EP group the slowest rank sets every step's pace, and MoE routing is skewed: a few experts per
layer take far more tokens than the mean. The planner (DeepSeek's EPLB idea, written for our placement
table) gives each rank `redundant_per_rank` slots beyond its E/G own, and fills them in two steps:

1. replicate: every expert has one copy; each extra slot goes to the expert whose load per copy is
   largest now (an expert has at most one copy per rank: two on one rank would share its work for
   nothing);
2. pack: copies, heaviest first (an expert's load split evenly over its copies), go to the rank with
   the least load that still has a free slot and no copy of that expert.

Where ranks are grouped by node and the experts split evenly over the nodes, the plan is hierarchical:
experts are first packed onto nodes (heaviest first, to the lightest node with room), then replicated
and packed within their node, so that every copy of an expert stays on one node (a token's trip to a
copy never leaves the node its expert lives on).

Pure functions of the counts: the same counts give the same plan. How the group moves to a new plan
while it serves is not here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from parallel.placement import ExpertPlacement


@dataclass(frozen=True)
class LayerPlan:
    placement: ExpertPlacement
    imbalance_before: float  # busiest rank / mean rank load under the placement planned from
    imbalance_after: float  # the same under `placement`


def rank_loads(counts: Sequence[float], placement: ExpertPlacement) -> list[float]:
    """Expected tokens per rank: each expert's tokens split evenly over its copies."""
    copies = [0] * placement.num_experts
    for ids in placement.rank_expert_ids:
        for expert in ids:
            copies[expert] += 1
    return [sum(counts[e] / copies[e] for e in ids) for ids in placement.rank_expert_ids]


def imbalance(loads: Sequence[float]) -> float:
    """The busiest rank's load over the mean (1.0: perfectly even; also when there is no load)."""
    mean = sum(loads) / len(loads)
    return max(loads) / mean if mean > 0 else 1.0


def plan_layer(counts: Sequence[float], world_size: int, redundant_per_rank: int,
               node_of_rank: Sequence[int] | None = None) -> ExpertPlacement:
    """The placement of one layer's experts (see the module).

    Args:
        counts: tokens routed to each expert over the window ([num_experts], >= 0).
        world_size: G, the ranks of the group; it must divide the number of experts.
        redundant_per_rank: R, slots per rank beyond its E/G.
        node_of_rank: the node of each rank (ranks of a node need not be adjacent); None: one node.
    Raises:
        ValueError on inconsistent arguments.
    """
    num_experts = len(counts)
    if world_size <= 0 or num_experts % world_size:
        raise ValueError(f"world_size must divide the number of experts ({num_experts}), got {world_size}")
    if redundant_per_rank < 0:
        raise ValueError(f"redundant_per_rank must be >= 0, got {redundant_per_rank}")
    if any(c < 0 for c in counts):
        raise ValueError("counts must be >= 0")
    node_of_rank = list(node_of_rank) if node_of_rank is not None else [0] * world_size
    if len(node_of_rank) != world_size:
        raise ValueError(f"node_of_rank must name the node of each of the {world_size} ranks, got {len(node_of_rank)}")
    nodes = sorted(set(node_of_rank))
    ranks_of = {node: [r for r in range(world_size) if node_of_rank[r] == node] for node in nodes}
    per_rank = num_experts // world_size
    if len({len(r) for r in ranks_of.values()}) == 1 and num_experts % len(nodes) == 0:
        experts_of = _split_over_nodes(counts, nodes, num_experts // len(nodes))
    else:  # uneven nodes: one pool (copies may then cross nodes)
        experts_of = {nodes[0]: list(range(num_experts))}
        ranks_of = {nodes[0]: list(range(world_size))}
    held: list[list[int]] = [[] for _ in range(world_size)]
    for node, experts in experts_of.items():
        ranks = ranks_of[node]
        copies = _replicate(counts, experts, len(ranks) * (per_rank + redundant_per_rank), len(ranks))
        for rank, ids in _pack(counts, copies, ranks, per_rank + redundant_per_rank).items():
            held[rank] = ids
    return ExpertPlacement(num_experts, tuple(tuple(sorted(ids)) for ids in held))


def plan(counts: Sequence[Sequence[float]], world_size: int, redundant_per_rank: int,
         node_of_rank: Sequence[int] | None = None, current: Sequence[ExpertPlacement] | None = None
         ) -> list[LayerPlan]:
    """`plan_layer` for every layer, with each layer's imbalance before (under `current`, default the
    contiguous placement) and after."""
    plans = []
    for layer, layer_counts in enumerate(counts):
        before = current[layer] if current is not None else ExpertPlacement.contiguous(len(layer_counts), world_size)
        after = plan_layer(layer_counts, world_size, redundant_per_rank, node_of_rank)
        plans.append(LayerPlan(after, imbalance(rank_loads(layer_counts, before)),
                               imbalance(rank_loads(layer_counts, after))))
    return plans


def _split_over_nodes(counts: Sequence[float], nodes: list[int], per_node: int) -> dict[int, list[int]]:
    """Experts onto nodes, `per_node` each: heaviest first, to the lightest node with room."""
    load = {node: 0.0 for node in nodes}
    experts_of: dict[int, list[int]] = {node: [] for node in nodes}
    for expert in sorted(range(len(counts)), key=lambda e: (-counts[e], e)):
        node = min((n for n in nodes if len(experts_of[n]) < per_node), key=lambda n: (load[n], n))
        experts_of[node].append(expert)
        load[node] += counts[expert]
    return experts_of


def _replicate(counts: Sequence[float], experts: list[int], num_slots: int, max_copies: int) -> dict[int, int]:
    """Copies per expert filling `num_slots`: each extra one to the largest load per copy (ties: the
    lower id), at most `max_copies` (one per rank) each; slots no expert can take stay empty."""
    copies = {e: 1 for e in experts}
    for _ in range(num_slots - len(experts)):
        open_experts = [e for e in experts if copies[e] < max_copies]
        if not open_experts:
            break
        best = max(open_experts, key=lambda e: (counts[e] / copies[e], -e))
        copies[best] += 1
    return copies


def _pack(counts: Sequence[float], copies: dict[int, int], ranks: list[int], slots: int) -> dict[int, list[int]]:
    """Copies onto ranks, `slots` each at most: heaviest copy first, to the least loaded rank with a free
    slot and no copy of that expert (ties: the lower rank). A copy with nowhere to go is dropped (its
    expert's other copies then share its tokens); every expert keeps at least one."""
    items = sorted(((counts[e] / n, e) for e, n in copies.items() for _ in range(n)), key=lambda x: (-x[0], x[1]))
    load = {r: 0.0 for r in ranks}
    held: dict[int, list[int]] = {r: [] for r in ranks}
    placed = {e: 0 for e in copies}
    for weight, expert in items:
        fits = [r for r in ranks if len(held[r]) < slots and expert not in held[r]]
        if not fits:  # every rank with room holds this expert already: this copy is dropped
            assert placed[expert], f"expert {expert} found no rank ({slots} slots on each of {len(ranks)})"
            continue
        rank = min(fits, key=lambda r: (load[r], r))
        held[rank].append(expert)
        load[rank] += weight
        placed[expert] += 1
    return held
