"""parallel/rebalance.py: EP groups with redundant expert copies, rearranged between steps while engines
generate (loopback ranks as threads). The cluster-level test (Ray actors, gloo) is in test_cluster_eplb.py."""

from __future__ import annotations

import pytest
import torch

import gptoss
from engine import Engine, EngineConfig
from gptoss.checkpoint import CheckpointReader, detect_layout
from gptoss.load import read_experts
from parallel import ExpertPlacement, LoopbackGroup, apply_expert_parallel
from parallel.eplb import imbalance, rank_loads
from parallel.rebalance import ExpertRebalancer, WindowCounts, initial_placement, keep_slots
from tests.engine_helpers import greedy, make_prompts, reference_greedy
from tests.parallel_helpers import EP_CONFIG

HOT_EXPERTS = {3: 3.0, 4: 2.5, 5: 2.0}  # router bias boosts: experts 3-5 take most tokens (all on rank 0 of 4)


@pytest.fixture(scope="module")
def skewed_checkpoint(tmp_path_factory):
    return gptoss.write_random_checkpoint(tmp_path_factory.mktemp("skewed"), EP_CONFIG, seed=5,
                                          router_bias_boost=HOT_EXPERTS)


@pytest.fixture(scope="module")
def reference(skewed_checkpoint) -> gptoss.Transformer:
    return gptoss.load_model(skewed_checkpoint, dtype=torch.float32)


def test_the_writers_router_boost_skews_the_routing(reference):
    ids, _ = reference.layers[0].mlp.router(torch.randn(256, EP_CONFIG.hidden_size))
    counts = torch.bincount(ids.flatten(), minlength=EP_CONFIG.num_local_experts)
    assert counts[[3, 4, 5]].sum() > 0.5 * counts.sum()
    loads = rank_loads(counts.tolist(), ExpertPlacement.contiguous(EP_CONFIG.num_local_experts, 4))
    assert imbalance(loads) >= 1.5


def test_initial_placement_gives_every_rank_its_share_and_r_copies_of_others():
    placement = initial_placement(16, 4, 2)
    assert placement.rank_expert_ids[0] == (0, 1, 2, 3, 4, 5)
    assert placement.rank_expert_ids[3] == (12, 13, 14, 15, 0, 1)
    assert all(len(ids) == 6 for ids in placement.rank_expert_ids)
    with pytest.raises(ValueError, match="redundant_per_rank must be at most 12"):
        initial_placement(16, 4, 13)


def test_keep_slots_leaves_kept_experts_in_their_slots_and_puts_new_ones_in_freed_ones():
    current = ExpertPlacement(8, ((0, 1, 2), (3, 4, 5), (6, 7, 0)))
    planned = ExpertPlacement(8, ((0, 2, 7), (1, 3, 4), (5, 6)))  # rank 2 holds one fewer
    kept = keep_slots(current, planned)
    assert kept.rank_expert_ids == ((0, 7, 2), (3, 4, 1), (6, 5))
    assert [set(ids) for ids in kept.rank_expert_ids] == [set(ids) for ids in planned.rank_expert_ids]
    assert keep_slots(current, ExpertPlacement(8, ((0, 1, 2, 3), (3, 4, 5), (6, 7, 0)))).rank_expert_ids[0] \
        == (0, 1, 2, 3)


def _run_group(checkpoint, world_size: int, prompts, max_tokens: int, *, redundant: int = 1,
               rearrange_at_step: int | None = None, transfer: str = "checkpoint", failing_rank: int | None = None):
    """Engines of a loopback EP group in lockstep; at `rearrange_at_step`, every rank rearranges."""
    placement = initial_placement(EP_CONFIG.num_local_experts, world_size, redundant)
    group = LoopbackGroup(world_size, timeout_s=60)
    reader = CheckpointReader(detect_layout(checkpoint))

    def run_rank(comm):
        model = gptoss.load_model(checkpoint, dtype=torch.float32, experts=placement.expert_ids(comm.rank))
        counts = apply_expert_parallel(model, comm, placement)
        window = WindowCounts(counts, window_steps=1000)

        def read(layer, ids):
            if comm.rank == failing_rank:
                raise OSError("checkpoint gone")
            return read_experts(reader, layer, ids, model.layers[0].mlp.experts.packed, torch.float32, "cpu")

        rebalancer = ExpertRebalancer(model, comm, [placement] * EP_CONFIG.num_hidden_layers,
                                      redundant_per_rank=redundant, read_experts=read, transfer=transfer)
        engine = Engine(model, EngineConfig(block_size=4, num_kv_blocks=128, max_num_batched_tokens=64,
                                            max_num_seqs=8))
        for i, prompt in enumerate(prompts):
            if i % world_size == comm.rank:
                engine.add_request(f"r{i}", prompt, greedy(max_tokens))
        tokens: dict[str, list[int]] = {}
        step, result = 0, None
        while comm.all_reduce_ints([int(engine.has_work())], op="max")[0]:
            if step == rearrange_at_step:
                result = rebalancer.rearrange(window.window())
            for out in engine.step():
                tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
            step += 1
            window.step_done(step)
        return tokens, result, rebalancer.placements

    return group.run(run_rank, timeout_s=120)


def test_a_group_with_expert_copies_equals_the_single_rank_model(skewed_checkpoint, reference):
    prompts = make_prompts([7, 12, 5, 9], seed=31, vocab=EP_CONFIG.vocab_size)
    results = _run_group(skewed_checkpoint, 4, prompts, 6, redundant=2)
    tokens = {k: v for rank_tokens, _, _ in results for k, v in rank_tokens.items()}
    for i, prompt in enumerate(prompts):
        assert tokens[f"r{i}"] == reference_greedy(reference, prompt, 6), i


@pytest.mark.parametrize("transfer", ["checkpoint", "communicator"])
def test_a_rearrangement_in_the_middle_of_generation_changes_no_token(skewed_checkpoint, reference, transfer):
    prompts = make_prompts([6, 11, 4, 9, 13, 5, 8, 10], seed=32, vocab=EP_CONFIG.vocab_size)
    results = _run_group(skewed_checkpoint, 4, prompts, 12, rearrange_at_step=6, transfer=transfer)
    tokens = {k: v for rank_tokens, _, _ in results for k, v in rank_tokens.items()}
    for i, prompt in enumerate(prompts):
        assert tokens[f"r{i}"] == reference_greedy(reference, prompt, 12), i
    result, placements = results[0][1], results[0][2]
    assert result.transfer == transfer and not result.error
    # The hot experts (3, 4, 5, all on rank 0) were spread: every layer moved and is more even.
    assert result.changed_layers == (0, 1)
    for before, after in zip(result.imbalance_before, result.imbalance_after, strict=True):
        assert after < before
    assert max(result.imbalance_before) >= 1.5
    assert result.num_experts_fetched > 0 and result.pause_s > 0
    # Every rank agrees on the new placements, which differ from the start and between layers' counts.
    assert all(r[2] == placements for r in results)
    assert placements[0] != initial_placement(16, 4, 1)
    hot_holders = {r for e in HOT_EXPERTS for r, _ in placements[0].replicas(e)}
    assert len(hot_holders) >= 3


def test_a_rank_that_cannot_read_its_experts_keeps_every_ranks_layers_as_they_were(skewed_checkpoint, reference):
    prompts = make_prompts([6, 11, 4, 9], seed=33, vocab=EP_CONFIG.vocab_size)
    results = _run_group(skewed_checkpoint, 4, prompts, 8, rearrange_at_step=4, failing_rank=2)
    tokens = {k: v for rank_tokens, _, _ in results for k, v in rank_tokens.items()}
    for i, prompt in enumerate(prompts):
        assert tokens[f"r{i}"] == reference_greedy(reference, prompt, 8), i
    for _, result, placements in results:
        assert result.changed_layers == () and "could not read" in result.error
        assert placements == [initial_placement(16, 4, 1)] * EP_CONFIG.num_hidden_layers


def test_window_counts_cover_about_the_last_window_of_steps():
    from parallel import ExpertTokenCounts

    counts = ExpertTokenCounts(1, 4)
    window = WindowCounts(counts, window_steps=8)
    for step in range(1, 33):
        expert = 0 if step <= 16 else 1  # the traffic moves from expert 0 to expert 1 at step 16
        counts.add(0, torch.tensor([[expert]]))
        window.step_done(step)
    seen = window.window()[0].tolist()
    assert seen[0] == 0 and 8 <= seen[1] <= 10  # only the last ~8 steps (one period of slack)


def test_assemble_experts_takes_kept_experts_from_the_layer_and_new_ones_from_what_was_fetched(skewed_checkpoint):
    from parallel import assemble_experts

    held = gptoss.load_model(skewed_checkpoint, dtype=torch.float32, experts=[0, 1, 2, 3]).layers[1].mlp.experts
    reader = CheckpointReader(detect_layout(skewed_checkpoint))
    weights = read_experts(reader, 1, [9, 12], held.packed, torch.float32, "cpu")
    fetched = {e: {name: w[i] for name, w in weights.items()} for i, e in enumerate([9, 12])}
    built = assemble_experts(held, [12, 1, 9], EP_CONFIG, fetched)  # fewer experts than before: a new set
    want = gptoss.load_model(skewed_checkpoint, dtype=torch.float32, experts=[12, 1, 9]).layers[1].mlp.experts
    assert built.expert_ids == [12, 1, 9] and built.global_to_local.tolist() == want.global_to_local.tolist()
    for name, buffer in want.named_buffers(recurse=False):
        assert torch.equal(getattr(built, name), buffer), name
