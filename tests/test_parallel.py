"""parallel/: placement, the loopback communicator, the dispatcher and the expert-parallel MoE (one process)."""

from __future__ import annotations

import copy
import threading

import pytest
import torch

import gptoss
from parallel import (
    CommunicatorError,
    CommunicatorSpec,
    CommunicatorTimeout,
    ExpertParallelMoE,
    ExpertPlacement,
    ExpertTokenCounts,
    LoopbackGroup,
    TokenDispatcher,
    apply_expert_parallel,
    count_expert_tokens,
    create_communicator,
)
from tests.parallel_helpers import EP_CONFIG, mute_experts

H = EP_CONFIG.hidden_size
E = EP_CONFIG.num_local_experts


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    return str(gptoss.write_random_checkpoint(tmp_path_factory.mktemp("ep") / "ckpt", EP_CONFIG, seed=3))


@pytest.fixture(scope="module")
def reference(checkpoint) -> gptoss.Transformer:
    return gptoss.load_model(checkpoint, dtype=torch.float32, packed_experts=False)


def make_rank_models(reference: gptoss.Transformer, placement: ExpertPlacement, group: LoopbackGroup,
                     muted: dict[int, list[int]] | None = None):
    """One EP model per rank, cut from a copy of the reference; returns (models, their ExpertTokenCounts)."""
    models, counts = [], []
    for comm in group.communicators():
        model = copy.deepcopy(reference)
        mute_experts(model, muted or {})
        counts.append(apply_expert_parallel(model, comm, placement))
        models.append(model)
    return models, counts


def make_hidden(token_counts: list[int], seed: int = 0, dtype=torch.float32) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(n, H, generator=gen).to(dtype) for n in token_counts]


# --- placement ----------------------------------------------------------------------------------


def test_contiguous_placement_gives_each_rank_an_equal_run_of_experts():
    placement = ExpertPlacement.contiguous(16, 4)
    assert placement.world_size == 4
    assert [placement.expert_ids(r) for r in range(4)] == [list(range(4 * r, 4 * r + 4)) for r in range(4)]
    assert placement.routing_table(2) == [[(e // 4, e % 4)] for e in range(16)]


def test_contiguous_placement_explains_a_world_size_that_does_not_divide_the_experts():
    with pytest.raises(ValueError, match=r"world_size must divide num_experts \(16\).*got 3.*\[1, 2, 4, 8, 16\]"):
        ExpertPlacement.contiguous(16, 3)


@pytest.mark.parametrize("rank_expert_ids, match", [
    (((0, 1), (2,)), r"experts \[3\] are held by none"),
    (((0, 1, 1), (2, 3)), r"must not repeat an expert"),
    (((0, 1), (2, 3, 4)), r"ids in \[0, 4\)"),
    (((0, 1, 2, 3), ()), r"at least one expert"),
], ids=["unplaced-expert", "repeated-on-a-rank", "out-of-range", "empty-rank"])
def test_placement_rejects_tables_that_do_not_place_every_expert_sensibly(rank_expert_ids, match):
    with pytest.raises(ValueError, match=match):
        ExpertPlacement(4, rank_expert_ids)


def test_replicated_expert_is_served_locally_where_held_and_spread_over_copies_elsewhere():
    # Expert 0 is hot: ranks 0 and 2 hold a copy; rank 2 holds it as local expert 1.
    placement = ExpertPlacement(6, ((0, 1), (2, 3), (4, 0), (5,)))
    assert placement.replicas(0) == [(0, 0), (2, 1)]
    assert placement.routing_table(0)[0] == [(0, 0)] and placement.routing_table(2)[0] == [(2, 1)]  # its own
    assert placement.routing_table(1)[0] == placement.routing_table(3)[0] == [(0, 0), (2, 1)]  # spread


def test_tokens_of_an_expert_with_copies_are_shared_evenly_by_the_copies():
    from parallel.dispatcher import TokenDispatcher

    placement = ExpertPlacement(6, ((0, 1), (2, 3), (4, 0), (5,)))
    group = LoopbackGroup(4, timeout_s=30)

    def route(comm):
        dispatcher = TokenDispatcher(comm, placement)
        topk = torch.tensor([[0, 5]] * 9 + [[3, 0]])  # expert 0 in every token's top-2
        dest_rank, _, _, _ = dispatcher._route(topk)
        return [int((dest_rank == r).sum()) for r in range(4)]

    counts = group.run(route)
    assert counts[0][0] == 10 and counts[2][2] == 10  # a holder keeps its own tokens
    assert counts[1][0] == counts[1][2] == 5 and counts[3][0] == counts[3][2] == 5  # the others split them


# --- loopback communicator ----------------------------------------------------------------------


def test_loopback_all_to_all_delivers_uneven_rows_grouped_by_source():
    group = LoopbackGroup(3, timeout_s=10)

    def body(comm):
        r = comm.rank
        send_counts = [0 if d == r else r + d for d in range(3)]  # nothing to itself; rank 0 -> 1: 1 row...
        recv_counts = [0 if s == r else s + r for s in range(3)]
        send = torch.cat([torch.full((n, 2), 10.0 * r + d) for d, n in enumerate(send_counts)])
        return comm.all_to_all(send, send_counts, recv_counts)

    received = group.run(body)
    for r in range(3):
        expected = torch.cat([torch.full((0 if s == r else s + r, 2), 10.0 * s + r) for s in range(3)])
        assert torch.equal(received[r], expected)


def test_loopback_small_collectives_agree_on_every_rank():
    group = LoopbackGroup(3, timeout_s=10)

    def body(comm):
        comm.barrier()
        return (comm.all_gather_ints([comm.rank, 5]),
                [comm.all_reduce_ints([comm.rank, -comm.rank], op) for op in ("sum", "max", "min")])

    for gathered, reduced in group.run(body):
        assert gathered == [[0, 5], [1, 5], [2, 5]]
        assert reduced == [[3, -3], [2, 0], [0, -2]]


def test_loopback_rejects_recv_counts_that_disagree_with_what_the_peer_sends():
    group = LoopbackGroup(2, timeout_s=10)

    def body(comm):
        recv_counts = [1, 1] if comm.rank == 0 else [2, 1]  # rank 0 sends rank 1 only one row
        return comm.all_to_all(torch.zeros(2, 1), [1, 1], recv_counts)

    with pytest.raises(ValueError, match=r"recv_counts\[0\]=2 but rank 0 sends 1 rows here"):
        group.run(body)


def test_loopback_missing_peer_fails_every_other_rank_with_a_timeout_naming_it():
    group = LoopbackGroup(3, timeout_s=0.3)
    comms = group.communicators()
    errors: dict[int, CommunicatorError] = {}

    def body(rank):
        try:
            comms[rank].all_to_all(torch.zeros(3, 1), [1, 1, 1], [1, 1, 1], label="layer 0 dispatch")
        except CommunicatorError as e:
            errors[rank] = e

    threads = [threading.Thread(target=body, args=(r,)) for r in (0, 2)]  # rank 1 never arrives
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert sorted(errors) == [0, 2]
    for e in errors.values():
        assert isinstance(e, CommunicatorTimeout)
        assert e.missing_ranks == [1] and "all_to_all #0 (layer 0 dispatch)" in e.op
    with pytest.raises(CommunicatorError, match="broken"):  # the late rank finds the group broken
        comms[1].barrier()


def test_loopback_detects_ranks_calling_different_collectives():
    group = LoopbackGroup(2, timeout_s=10)

    def body(comm):
        if comm.rank == 0:
            return comm.all_gather_ints([1])
        return comm.barrier()

    with pytest.raises(CommunicatorError, match="out of lockstep at collective #0"):
        group.run(body)


@pytest.mark.parametrize("kwargs, match", [
    (dict(backend="loopback", world_size=2), "use parallel.LoopbackGroup"),
    (dict(backend="cupy_nccl", world_size=2, nccl_unique_id=b"x"), "128 bytes"),
    (dict(backend="torch_dist", world_size=2), "master_addr and master_port"),
    (dict(backend="torch_dist", world_size=2, master_addr="h", master_port=1, torch_backend="mpi"), "torch_backend"),
    (dict(backend="torch_dist", world_size=2, master_addr="h", master_port=1, timeout_s=0), "timeout_s must be > 0"),
], ids=["loopback", "short-nccl-id", "no-master", "bad-torch-backend", "zero-timeout"])
def test_communicator_spec_names_the_field_that_is_wrong(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CommunicatorSpec(**kwargs)


def test_create_communicator_rejects_a_rank_outside_the_group():
    spec = CommunicatorSpec("torch_dist", 2, master_addr="127.0.0.1", master_port=1)
    with pytest.raises(ValueError, match=r"rank must be in \[0, 2\), got 2"):
        create_communicator(spec, 2)


# --- dispatcher -----------------------------------------------------------------------------------


def test_dispatch_sends_each_token_once_per_destination_rank_and_groups_rows_by_expert():
    world_size, k = 4, 4
    placement = ExpertPlacement.contiguous(E, world_size)
    group = LoopbackGroup(world_size, timeout_s=10)
    hidden = make_hidden([6, 0, 9, 3])
    gen = torch.Generator().manual_seed(1)
    topk = [torch.rand(len(x), E, generator=gen).topk(k).indices for x in hidden]
    weights = [torch.rand(len(x), k, generator=gen) for x in hidden]

    def body(comm):
        dispatcher = TokenDispatcher(comm, placement)
        r = comm.rank
        expert_in, counts, handle = dispatcher.dispatch(hidden[r], topk[r], weights[r])
        out = dispatcher.combine(expert_in, handle)  # identity experts: out = sum of the weights * x
        return expert_in, counts, handle.send_counts, out

    results = group.run(body)
    for r, (_, _, send_counts, out) in enumerate(results):
        ranks_per_token = [len({e // 4 for e in row.tolist()}) for row in topk[r]]
        expected_send = [sum(1 for row in topk[r] if any(e // 4 == d for e in row.tolist())) for d in range(4)]
        assert send_counts == expected_send and sum(send_counts) == sum(ranks_per_token)
        torch.testing.assert_close(out, hidden[r] * weights[r].sum(1, keepdim=True), rtol=1e-6, atol=1e-6)
    for r, (expert_in, counts, _, _) in enumerate(results):
        # every (token, expert) pair routed to rank r, grouped by its local expert
        for local, rows in zip(range(4), expert_in.split(counts), strict=True):
            expert = 4 * r + local
            expected = torch.cat([hidden[s][(topk[s] == expert).any(1)] for s in range(world_size)])
            assert torch.equal(rows, expected)


def test_expert_token_counts_count_the_tokens_each_rank_routes_to_each_expert():
    counts = ExpertTokenCounts(num_layers=2, num_experts=4)
    counts.add(1, torch.tensor([[0, 3], [3, 2]]))
    counts.add(1, torch.tensor([[3, 1]]))
    assert counts.get_counts().tolist() == [[0, 0, 0, 0], [1, 1, 1, 3]]
    assert counts.take_counts()[1].tolist() == [1, 1, 1, 3]
    assert counts.get_counts().sum() == 0


# --- expert-parallel MoE == single rank ----------------------------------------------------------------


@pytest.mark.parametrize("world_size, token_counts, muted", [
    (1, [7], {}),
    (2, [5, 0], {0: [0, 9]}),
    (4, [3, 17, 0, 1], {0: [0, 1, 2, 3], 1: [15]}),  # layer 0: rank 0's experts all get nothing
], ids=["G1", "G2-idle-rank", "G4-idle-rank-and-unused-experts"])
def test_ep_moe_layers_and_logits_equal_the_single_rank_model(reference, world_size, token_counts, muted):
    placement = ExpertPlacement.contiguous(E, world_size)
    group = LoopbackGroup(world_size, timeout_s=30)
    models, rank_counts = make_rank_models(reference, placement, group, muted)
    single = copy.deepcopy(reference)
    mute_experts(single, muted)
    hidden = make_hidden(token_counts)
    gen = torch.Generator().manual_seed(2)
    token_ids = [torch.randint(0, EP_CONFIG.vocab_size, (n,), generator=gen) for n in token_counts]

    def body(comm):
        model = models[comm.rank]
        moe = [block.mlp(hidden[comm.rank]) for block in model.layers]
        return moe, model(token_ids[comm.rank])

    results = group.run(body)
    for r, (moe, logits) in enumerate(results):
        for layer, out in enumerate(moe):
            torch.testing.assert_close(out, single.layers[layer].mlp(hidden[r]), rtol=0, atol=1e-5)
        torch.testing.assert_close(logits, single(token_ids[r]), rtol=0, atol=2e-5)
    # Counts from every layer call above: the group's sum equals the single model's routing.
    total = sum(counts.get_counts() for counts in rank_counts)
    for layer in range(EP_CONFIG.num_hidden_layers):
        for e in muted.get(layer, []):
            assert total[layer, e] == 0
    expected_layer_counts = sum(token_counts) * 2 * EP_CONFIG.num_experts_per_tok  # MoE calls + the model
    assert total.sum(1).tolist() == [expected_layer_counts] * EP_CONFIG.num_hidden_layers


def test_a_single_rank_model_counts_the_same_expert_tokens_as_an_ep_group(reference):
    placement = ExpertPlacement.contiguous(E, 2)
    group = LoopbackGroup(2, timeout_s=30)
    models, rank_counts = make_rank_models(reference, placement, group)
    gen = torch.Generator().manual_seed(9)
    token_ids = [torch.randint(0, EP_CONFIG.vocab_size, (n,), generator=gen) for n in (6, 11)]
    group.run(lambda comm: models[comm.rank](token_ids[comm.rank]))
    single = copy.deepcopy(reference)
    counts = count_expert_tokens(single)
    for ids in token_ids:
        single(ids)
    assert torch.equal(counts.get_counts(), sum(c.get_counts() for c in rank_counts))
    assert counts.get_counts().sum() == 17 * EP_CONFIG.num_experts_per_tok * EP_CONFIG.num_hidden_layers
    with pytest.raises(ValueError, match="expert-parallel"):
        count_expert_tokens(models[0])


def test_ep_moe_with_replicated_hot_experts_equals_the_single_rank_moe(reference):
    # Experts 0 and 8 have a second copy on the other rank: each source uses a different owner.
    placement = ExpertPlacement(E, (tuple(range(8)) + (8,), tuple(range(8, 16)) + (0,)))
    group = LoopbackGroup(2, timeout_s=30)
    models, _ = make_rank_models(reference, placement, group)
    hidden = make_hidden([11, 6], seed=4)
    results = group.run(lambda comm: models[comm.rank].layers[1].mlp(hidden[comm.rank]))
    for r in range(2):
        torch.testing.assert_close(results[r], reference.layers[1].mlp(hidden[r]), rtol=0, atol=1e-5)


def test_ep_moe_spreading_tokens_over_copies_on_other_ranks_equals_the_single_rank_moe(reference):
    # Four ranks; experts 0 and 4 have copies on two ranks each, which the other two ranks' tokens share.
    per_rank = E // 4
    ranks = [tuple(range(r * per_rank, (r + 1) * per_rank)) for r in range(4)]
    placement = ExpertPlacement(E, (ranks[0], ranks[1], ranks[2] + (0,), ranks[3] + (per_rank,)))
    group = LoopbackGroup(4, timeout_s=30)
    models, _ = make_rank_models(reference, placement, group)
    hidden = make_hidden([13, 8, 0, 21], seed=6)
    results = group.run(lambda comm: models[comm.rank].layers[0].mlp(hidden[comm.rank]))
    for r in range(4):
        torch.testing.assert_close(results[r], reference.layers[0].mlp(hidden[r]), rtol=0, atol=1e-5)


def test_ep_moe_runs_packed_mxfp4_experts_and_equals_the_single_rank_moe(checkpoint):
    packed = gptoss.load_model(checkpoint, dtype=torch.float32, packed_experts=True)
    placement = ExpertPlacement.contiguous(E, 2)
    group = LoopbackGroup(2, timeout_s=30)
    models, _ = make_rank_models(packed, placement, group)
    assert models[1].layers[0].mlp.experts.packed
    hidden = make_hidden([4, 9], seed=5)
    results = group.run(lambda comm: models[comm.rank].layers[0].mlp(hidden[comm.rank]))
    for r in range(2):
        torch.testing.assert_close(results[r], packed.layers[0].mlp(hidden[r]), rtol=0, atol=1e-5)


def test_ep_moe_in_bfloat16_carries_router_weights_exactly_and_stays_close_to_the_single_rank_moe(checkpoint):
    # bf16 rows carry the float32 metadata bit for bit; only the extra rounding of per-rank partial sums
    # may differ from the single rank (about one bf16 ulp).
    model = gptoss.load_model(checkpoint, dtype=torch.bfloat16)
    placement = ExpertPlacement.contiguous(E, 4)
    group = LoopbackGroup(4, timeout_s=30)
    models, _ = make_rank_models(model, placement, group)
    hidden = make_hidden([8, 2, 0, 5], seed=6, dtype=torch.bfloat16)
    results = group.run(lambda comm: models[comm.rank].layers[0].mlp(hidden[comm.rank]))
    for r in range(4):
        expected = model.layers[0].mlp(hidden[r])
        assert results[r].dtype == torch.bfloat16
        torch.testing.assert_close(results[r].float(), expected.float(), rtol=2e-2, atol=2e-2)


def test_every_rank_idle_still_steps_through_every_layer(reference):
    placement = ExpertPlacement.contiguous(E, 2)
    group = LoopbackGroup(2, timeout_s=30)
    models, _ = make_rank_models(reference, placement, group)
    results = group.run(lambda comm: models[comm.rank](torch.zeros(0, dtype=torch.long)))
    assert [tuple(r.shape) for r in results] == [(0, EP_CONFIG.vocab_size)] * 2


def test_apply_expert_parallel_rejects_a_model_without_the_ranks_experts(checkpoint):
    model = gptoss.load_model(checkpoint, dtype=torch.float32, experts=[0, 1, 2, 3])
    comm = LoopbackGroup(2).communicators()[1]
    with pytest.raises(ValueError, match=r"missing \[8, 9, 10, 11, 12, 13, 14, 15\].*load_model"):
        apply_expert_parallel(model, comm, ExpertPlacement.contiguous(E, 2))


@pytest.mark.parametrize("placement, match", [
    (ExpertPlacement.contiguous(8, 2), "num_experts must equal the model's num_local_experts"),
    (ExpertPlacement.contiguous(E, 4), "world_size must equal the communicator's world_size"),
], ids=["wrong-expert-count", "wrong-world-size"])
def test_apply_expert_parallel_rejects_a_placement_that_does_not_fit(reference, placement, match):
    with pytest.raises(ValueError, match=match):
        apply_expert_parallel(copy.deepcopy(reference), LoopbackGroup(2).communicators()[0], placement)


def test_ep_moe_keeps_the_models_router_and_uses_only_the_ranks_experts(reference):
    model = copy.deepcopy(reference)
    apply_expert_parallel(model, LoopbackGroup(2).communicators()[1], ExpertPlacement.contiguous(E, 2))
    mlp = model.layers[0].mlp
    assert isinstance(mlp, ExpertParallelMoE)
    assert mlp.router is model.layers[0].mlp.router and mlp.experts.expert_ids == list(range(8, 16))
    torch.testing.assert_close(mlp.experts.down_proj[0], reference.layers[0].mlp.experts.down_proj[8])
