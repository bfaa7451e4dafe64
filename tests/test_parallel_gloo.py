"""parallel/ over real gloo process groups: one spawned process per rank, on CPU."""

from __future__ import annotations

import multiprocessing as mp

import pytest
import torch

import gptoss
from tests.parallel_helpers import (
    EP_CONFIG,
    gloo_ep_worker,
    gloo_missing_peer_worker,
    mute_experts,
    run_spawned,
)

TIMEOUT_S = 4.0  # the report grace period within it is then 1 s


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    return str(gptoss.write_random_checkpoint(tmp_path_factory.mktemp("ep-gloo") / "ckpt", EP_CONFIG, seed=7))


@pytest.mark.parametrize("world_size, token_counts, muted", [
    (2, [9, 0], {1: [3, 12]}),
    (4, [4, 0, 13, 1], {0: [4, 5, 6, 7], 1: [0]}),  # layer 0: rank 1's experts all get nothing
], ids=["G2", "G4"])
def test_gloo_ep_group_computes_what_the_single_rank_model_computes(checkpoint, world_size, token_counts, muted):
    gen = torch.Generator().manual_seed(world_size)
    layers = range(EP_CONFIG.num_hidden_layers)
    moe_inputs = [[torch.randn(n, EP_CONFIG.hidden_size, generator=gen) for _ in layers] for n in token_counts]
    token_ids = [torch.randint(0, EP_CONFIG.vocab_size, (n,), generator=gen) for n in token_counts]

    results = run_spawned(gloo_ep_worker, world_size, checkpoint, moe_inputs, token_ids, muted, timeout_s=240)

    single = gptoss.load_model(checkpoint, dtype=torch.float32)
    mute_experts(single, muted)
    for r, result in enumerate(results):
        assert result["gathered"] == [[s, 10 * s] for s in range(world_size)]
        g = world_size
        assert result["reduced"] == {"sum": [g * (g - 1) // 2, -g * (g - 1) // 2], "max": [g - 1, 0], "min": [0, 1 - g]}
        expected_rows = torch.cat([torch.full((s + r, 3), 100.0 * s + r) for s in range(world_size)])
        assert torch.equal(result["exchanged"], expected_rows)
        for layer in layers:
            expected = single.layers[layer].mlp(moe_inputs[r][layer])
            torch.testing.assert_close(result["moe_out"][layer], expected, rtol=0, atol=1e-5)
        torch.testing.assert_close(result["logits"], single(token_ids[r]), rtol=0, atol=2e-5)
    counts = sum(result["counts"] for result in results)  # the logits pass only
    assert counts.sum(1).tolist() == [sum(token_counts) * EP_CONFIG.num_experts_per_tok] * len(layers)
    for layer, experts in muted.items():
        assert counts[layer, experts].sum() == 0


@pytest.mark.parametrize("how", ["stuck", "dead", "never_joins"])
def test_gloo_missing_peer_fails_every_other_rank_with_a_timeout_naming_it(how):
    release = mp.get_context("spawn").Event()
    world_size, missing = 3, 1
    # The stuck peer is released only once both others have reported: they cannot have waited for it.
    # Each waits for its failing all-to-all at most its deadline (the report grace period is part of
    # it) plus slack for a loaded machine, and fails the test past that.
    results = run_spawned(gloo_missing_peer_worker, world_size, missing, how, TIMEOUT_S, TIMEOUT_S + 10.0, release,
                          timeout_s=120, on_report=lambda reports: release.set() if {0, 2} <= set(reports) else None)
    for rank in (0, 2):
        result = results[rank]
        assert result["error"] == "CommunicatorTimeout", result
        assert result["missing_ranks"] == [missing], result["message"]
        assert f"ranks [{missing}]" in result["message"]
        if how == "never_joins":
            assert result["op"] == "init"
        else:
            assert result["op"] == "all_to_all #1 (layer 0 dispatch)"
            assert "broken" in result["later"]


def test_joining_has_its_own_deadline_apart_from_the_collectives():
    import socket

    from parallel import CommunicatorSpec, CommunicatorTimeout, create_communicator

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # Collectives may wait 60 s; a peer that never joins is named after the 1 s join deadline.
    spec = CommunicatorSpec("torch_dist", 2, timeout_s=60.0, join_timeout_s=1.0, master_addr="127.0.0.1",
                            master_port=port)
    with pytest.raises(CommunicatorTimeout, match=r"ranks \[1\] did not join the group within 1.0 s"):
        create_communicator(spec, rank=0)
