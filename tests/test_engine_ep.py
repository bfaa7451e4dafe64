"""engine/ inside an expert-parallel group: one Engine per rank (loopback ranks as threads), in lockstep."""

from __future__ import annotations

import copy

import pytest
import torch

import gptoss
from engine import Engine, EngineConfig
from parallel import ExpertPlacement, LoopbackGroup, apply_expert_parallel
from tests.engine_helpers import greedy, make_prompts, reference_greedy
from tests.parallel_helpers import EP_CONFIG


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> gptoss.Transformer:
    path = gptoss.write_random_checkpoint(tmp_path_factory.mktemp("engine-ep"), EP_CONFIG, seed=3)
    return gptoss.load_model(path, dtype=torch.float32)


def test_engines_of_an_ep_group_step_in_lockstep_with_an_idle_rank_and_equal_the_single_rank_model(reference):
    world_size = 2
    placement = ExpertPlacement.contiguous(EP_CONFIG.num_local_experts, world_size)
    group = LoopbackGroup(world_size, timeout_s=30)
    models = []
    for comm in group.communicators():
        models.append(copy.deepcopy(reference))
        apply_expert_parallel(models[-1], comm, placement)
    # Rank 0 is busy for many steps; rank 1 has one short request, then steps with zero tokens.
    prompts = [make_prompts([19, 4, 30], seed=20, vocab=EP_CONFIG.vocab_size), make_prompts([5], seed=21, vocab=1024)]
    max_tokens = [[9, 14, 6], [2]]

    def run_rank(comm):
        engine = Engine(models[comm.rank], EngineConfig(block_size=4, num_kv_blocks=64, max_num_batched_tokens=16,
                                                        max_num_seqs=4))
        for i, prompt in enumerate(prompts[comm.rank]):
            engine.add_request(f"r{i}", prompt, greedy(max_tokens[comm.rank][i]))
        tokens: dict[str, list[int]] = {}
        num_steps = num_idle_steps = 0
        # The group steps while any rank has work (the decision the cluster layer makes each step).
        while comm.all_reduce_ints([int(engine.has_work())], op="max")[0]:
            num_idle_steps += not engine.has_work()
            for out in engine.step():
                tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
            num_steps += 1
        return tokens, num_steps, num_idle_steps

    results = group.run(run_rank)
    assert results[0][1] == results[1][1] and results[1][2] > 5
    for rank, (tokens, _, _) in enumerate(results):
        for i, prompt in enumerate(prompts[rank]):
            assert tokens[f"r{i}"] == reference_greedy(reference, prompt, max_tokens[rank][i]), (rank, i)
