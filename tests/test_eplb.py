"""The EPLB planner (parallel/eplb.py): on skewed routing counts it evens the ranks' loads with the
redundant slots it is given, never does worse than the default placement, keeps an expert's copies on
one node, and is deterministic."""

from __future__ import annotations

import random

import pytest

from benchmarks.bench_eplb import zipf_counts
from parallel.eplb import imbalance, plan, plan_layer, rank_loads
from parallel.placement import ExpertPlacement


@pytest.mark.parametrize(("num_experts", "world_size", "s"), [(32, 4, 1.0), (128, 8, 1.0), (128, 16, 1.5)])
def test_one_redundant_expert_per_rank_evens_a_zipf_layer(num_experts, world_size, s):
    counts = zipf_counts(num_experts, s, random.Random(num_experts + world_size))
    [layer] = plan([counts], world_size, redundant_per_rank=1)
    assert layer.imbalance_before >= 1.5  # the default placement: the popular experts pile up
    assert layer.imbalance_after <= 1.10, layer
    assert layer.imbalance_after == pytest.approx(imbalance(rank_loads(counts, layer.placement)))
    assert all(len(ids) <= num_experts // world_size + 1 for ids in layer.placement.rank_expert_ids)


def test_an_expert_taking_half_the_tokens_is_copied_onto_every_rank():
    counts = [1.0] * 32
    counts[5] = 31.0  # half of all tokens
    placement = plan_layer(counts, world_size=4, redundant_per_rank=1)
    assert [rank for rank, _ in placement.replicas(5)] == [0, 1, 2, 3]
    assert imbalance(rank_loads(counts, placement)) <= 1.10


@pytest.mark.parametrize("redundant", [0, 1, 2])
def test_the_plan_is_never_worse_than_the_default_placement(redundant):
    rng = random.Random(7)
    for _ in range(50):
        counts = [rng.expovariate(1.0) ** 3 for _ in range(16)]
        default = imbalance(rank_loads(counts, ExpertPlacement.contiguous(16, 4)))
        planned = imbalance(rank_loads(counts, plan_layer(counts, 4, redundant)))
        assert planned <= default + 1e-9


def test_copies_stay_on_their_experts_node_and_the_plan_is_deterministic():
    counts = zipf_counts(64, 1.2, random.Random(3))
    node_of_rank = [0, 1, 0, 1, 0, 1, 0, 1]  # two nodes, ranks interleaved
    placement = plan_layer(counts, 8, 2, node_of_rank)
    for expert in range(64):
        assert len({node_of_rank[rank] for rank, _ in placement.replicas(expert)}) == 1
    assert sum(len(placement.replicas(e)) for e in range(64)) == 64 + 8 * 2
    assert plan_layer(counts, 8, 2, node_of_rank) == placement
    assert imbalance(rank_loads(counts, placement)) <= 1.10


def test_bad_arguments_are_refused_by_name():
    with pytest.raises(ValueError, match="world_size must divide"):
        plan_layer([1.0] * 10, 4, 1)
    with pytest.raises(ValueError, match="node_of_rank"):
        plan_layer([1.0] * 8, 4, 1, node_of_rank=[0, 1])
    with pytest.raises(ValueError, match="counts must be >= 0"):
        plan_layer([1.0, -1.0], 2, 0)
