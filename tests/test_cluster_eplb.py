"""Expert load balancing in a running EP group: 4 rank actors across the simulated two-node cluster (gloo),
a checkpoint whose routers favor two experts, rearrangements on the interval and on an admin call while
16 streams run; and behind Serve: the model server's admin call and the gptoss_eplb_* metrics."""

import asyncio

import pytest
import torch

import gptoss
from cluster import EPGroup, EplbConfig, GroupConfig
from engine.config import EngineConfig
from engine.engine import Engine
from engine.sampling_params import SamplingParams
from parallel.rebalance import initial_placement
from tests.conftest import SERVE_TEST_CONFIG
from tests.serve_helpers import metric_total

ENGINE = EngineConfig(num_kv_blocks=128, max_num_seqs=8, max_num_batched_tokens=128, block_size=8)
GREEDY = SamplingParams(max_tokens=24, temperature=0.0)
MODEL = gptoss.get_preset("tiny")  # 8 experts: 2 a rank, plus 1 redundant slot
HOT_EXPERTS = {0: 3.0, 1: 2.5}  # both on rank 0 by default


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return gptoss.write_random_checkpoint(tmp_path_factory.mktemp("eplb"), MODEL, seed=7,
                                          router_bias_boost=HOT_EXPERTS)


def prompts(n: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(11)
    return [torch.randint(0, 199998, (int(torch.randint(4, 30, (1,), generator=gen)),), generator=gen).tolist()
            for _ in range(n)]


def test_rearrangements_while_16_streams_run_change_no_token_and_fail_no_request(ray_cluster, event_loop_thread,
                                                                                   checkpoint):
    eplb = EplbConfig(enabled=True, redundant_experts_per_rank=1, interval_steps=10, window_steps=8,
                      transfer="communicator")
    group = EPGroup(GroupConfig(checkpoint=str(checkpoint), num_ranks=4, dtype="float32", engine=ENGINE,
                                collective_timeout_s=10.0, placement_timeout_s=20.0, eplb=eplb, name="eplb"))
    run = event_loop_thread
    work = prompts(16)
    expected = [list(c.token_ids) for c in Engine(gptoss.load_model(checkpoint, dtype=torch.float32),
                                                  ENGINE).generate(work, GREEDY)]

    async def scenario():
        first_tokens = asyncio.Event()

        async def stream(i):
            tokens = []
            async for out in group.generate(f"s{i}", work[i], GREEDY):
                tokens += out.new_token_ids
                first_tokens.set()
            return tokens

        tasks = [asyncio.create_task(stream(i)) for i in range(16)]
        await first_tokens.wait()
        asked = await group.rebalance_experts()  # in the middle of the streams
        return await asyncio.gather(*tasks), asked, await group.stats()

    run(group.start(), timeout_s=180)
    try:
        got, asked, stats = run(scenario(), timeout_s=180)
    finally:
        run(group.shutdown())
    assert got == expected
    # The admin call ran one; the interval (every 10 steps of 24+) ran others; the hot experts were spread.
    assert stats.eplb.num_rearrangements >= 2 and stats.eplb.num_layers_moved >= 1
    assert asked.transfer == "communicator" and not asked.error
    last = stats.eplb.last
    assert max(last.imbalance_after) <= max(last.imbalance_before)
    start = initial_placement(MODEL.num_local_experts, 4, 1)
    layers = [r.layer_expert_ids for r in stats.ranks]
    assert any(layers[r][layer] != start.rank_expert_ids[r] for r in range(4) for layer in range(2))
    holders = {r for r in range(4) for layer in range(2) if {0, 1} & set(layers[r][layer])}
    assert len(holders) >= 3
    assert stats.eplb.pause_s_total > 0


def test_one_admin_call_is_one_rearrangement_even_when_its_copy_reaches_a_rank_late(ray_cluster, event_loop_thread,
                                                                                       checkpoint):
    # The group sends each rank a copy of the call. A copy that arrives after the others started the
    # rearrangement (here: sent only once the first has finished) is answered by it, not by another.
    eplb = EplbConfig(enabled=True, redundant_experts_per_rank=1, interval_steps=0)
    group = EPGroup(GroupConfig(checkpoint=str(checkpoint), num_ranks=2, dtype="float32", engine=ENGINE,
                                collective_timeout_s=10.0, placement_timeout_s=20.0, eplb=eplb, name="eplb-ask"))
    run = event_loop_thread

    async def scenario():
        ranks, ask = group._ranks, next(group._rebalance_asks)  # the test sends the group's copies itself
        first = await ranks[0].rebalance_experts.remote(ask)
        after_first = await group.stats()
        late = await asyncio.wait_for(ranks[1].rebalance_experts.remote(ask), timeout=10)
        after_late = await group.stats()
        await group.rebalance_experts()  # the group's own next call: its number is new, so one more
        return first, late, after_first, after_late, await group.stats()

    run(group.start(), timeout_s=180)
    try:
        first, late, after_first, after_late, after_next = run(scenario(), timeout_s=120)
    finally:
        run(group.shutdown())
    counts = [[r.eplb.num_rearrangements for r in s.ranks] for s in (after_first, after_late, after_next)]
    assert counts == [[1, 1], [1, 1], [2, 2]]
    assert late.imbalance_before == first.imbalance_before and not late.error


def test_rebalance_is_refused_where_eplb_is_off(ray_cluster, event_loop_thread, checkpoint):
    group = EPGroup(GroupConfig(checkpoint=str(checkpoint), num_ranks=2, dtype="float32", engine=ENGINE))
    with pytest.raises(ValueError, match="expert load balancing is off"):
        event_loop_thread(group.rebalance_experts())
    with pytest.raises(ValueError, match="eplb.enabled needs num_ranks >= 2"):
        GroupConfig(checkpoint=str(checkpoint), num_ranks=1, eplb=EplbConfig(enabled=True))


def test_the_model_servers_admin_call_rearranges_and_the_metrics_show_it(serve_instance, checkpoint):
    import requests
    from ray import serve

    from serve.app import MODEL_SERVER_NAME, build_app_from_config
    from serve.config import parse_config

    raw = {**SERVE_TEST_CONFIG, "model": {**SERVE_TEST_CONFIG["model"], "checkpoint": str(checkpoint), "name": "eplb"},
           "group": {"num_ranks": 2, "device": "cpu", "num_cpus_per_rank": 0.5, "step_timeout_s": 30},
           "eplb": {"enabled": True, "interval_steps": 0}}
    serve.run(build_app_from_config(parse_config(raw)), name="eplb", route_prefix="/eplb")
    try:
        body = {"model": "eplb", "prompt": [1, 2, 3, 4, 5], "max_tokens": 16, "temperature": 0}
        before = requests.post(f"{serve_instance.http}/eplb/v1/completions", json=body, timeout=60).json()
        handle = serve.get_deployment_handle(MODEL_SERVER_NAME, app_name="eplb")
        result = handle.rebalance_experts.remote().result(timeout_s=60)
        assert result.transfer == "checkpoint" and not result.error
        assert max(result.imbalance_after) <= max(result.imbalance_before)
        after = requests.post(f"{serve_instance.http}/eplb/v1/completions", json=body, timeout=60).json()
        assert after["choices"][0]["text"] == before["choices"][0]["text"]
        url = f"{serve_instance.http}/eplb/metrics"
        assert metric_total(url, "ray_gptoss_eplb_rearrangements_total", 'model="eplb"', timeout_s=60) == 1
        assert metric_total(url, "ray_gptoss_eplb_pause_seconds_count", 'model="eplb"', timeout_s=30) == 1
        assert metric_total(url, "ray_gptoss_eplb_imbalance", 'when="before"', at_least=2, timeout_s=30) >= 2
    finally:
        serve.delete("eplb")
