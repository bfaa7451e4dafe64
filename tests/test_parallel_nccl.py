"""The cupy_nccl backend: its NCCL call plan through a recording fake of `cupy.cuda.nccl` (CPU, threads), and
the real thing on 2+ GPUs (skipped otherwise)."""

from __future__ import annotations

import copy
import platform
import subprocess
import sys
import threading
from collections import defaultdict
from pathlib import Path

import pytest
import torch

import gptoss
from parallel import (
    CommunicatorError,
    CommunicatorTimeout,
    CupyNcclCommunicator,
    ExpertPlacement,
    apply_expert_parallel,
)
from parallel.cupy_nccl import PeerTransfer, _cupy_unique_id, make_nccl_unique_id, plan_all_to_all
from tests.parallel_helpers import EP_CONFIG, FakeNccl, FakeNcclError, nccl_ep_worker, run_spawned

UNIQUE_ID = bytes(range(128))  # has bytes > 127: negative as signed chars (x86), not on aarch64


def run_fake_group(fake: FakeNccl, body, timeout_s: float = 10.0, ranks=None, stream_ordered: bool = False) -> dict:
    """Runs `body(comm)` for each rank (all by default) in its own thread on a fake-NCCL communicator, then
    closes it; returns results (or the exception raised) by rank."""
    results: dict[int, object] = {}

    def run(rank: int) -> None:
        try:
            comm = CupyNcclCommunicator(rank, fake.world_size, UNIQUE_ID, timeout_s,
                                        stream_ops=fake.streams(rank, stream_ordered))
            try:
                results[rank] = body(comm)
            finally:
                comm.close()
        except Exception as e:  # returned to the test
            results[rank] = e

    threads = [threading.Thread(target=run, args=(r,), daemon=True)
               for r in (range(fake.world_size) if ranks is None else ranks)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "a fake rank hung"
    return results


def check_call_plan(fake: FakeNccl, all_matched: bool = True) -> None:
    """NCCL's rules for grouped point-to-point calls, over everything every rank recorded."""
    sent, received = defaultdict(list), defaultdict(list)  # (src, dst) -> byte counts, in order
    for rank, calls in fake.calls.items():
        depth = 0
        for call in calls:
            if call[0] == "groupStart":
                depth += 1
            elif call[0] == "groupEnd":
                depth -= 1
                assert depth >= 0, f"rank {rank}: groupEnd without groupStart"
            elif call[0] in ("send", "recv"):
                kind, peer, nbytes, datatype, call_depth = call
                assert call_depth > 0 and depth > 0, f"rank {rank}: {kind} outside a group"
                assert peer != rank, f"rank {rank}: {kind} to itself"
                assert nbytes > 0, f"rank {rank}: zero-size {kind} with rank {peer}"
                assert datatype == FakeNccl.NCCL_UINT8
                (sent[(rank, peer)] if kind == "send" else received[(peer, rank)]).append(nbytes)
        assert depth == 0, f"rank {rank}: {depth} groups left open"
    if all_matched:
        assert dict(sent) == dict(received), "every send must meet a receive of the same size, in order"


def test_all_to_all_plan_skips_self_and_empty_transfers_and_offsets_by_bytes():
    plan = plan_all_to_all(1, send_counts=[2, 3, 0, 1], recv_counts=[0, 3, 4, 5], row_nbytes=10)
    assert plan.sends == (PeerTransfer(0, 0, 20), PeerTransfer(3, 50, 10))
    assert plan.recvs == (PeerTransfer(2, 30, 40), PeerTransfer(3, 70, 50))
    assert plan.local == (2, 0, 3) and plan.peers == [0, 2, 3]
    with pytest.raises(ValueError, match="sends itself 3 rows but expects 2"):
        plan_all_to_all(1, [0, 3], [0, 2], row_nbytes=10)


@pytest.mark.parametrize("machine, char_is_signed", [("x86_64", True), ("aarch64", False)],
                         ids=["x86_64-signed-char", "aarch64-unsigned-char"])
def test_nccl_unique_id_crosses_processes_as_bytes_and_reaches_cupy_as_the_platforms_chars(
        monkeypatch, machine, char_is_signed):
    monkeypatch.setattr(platform, "machine", lambda: machine)
    fake = FakeNccl(2, char_is_signed=char_is_signed)
    fake.install(monkeypatch)
    unique_id = make_nccl_unique_id()
    assert isinstance(unique_id, bytes) and len(unique_id) == 128
    assert _cupy_unique_id(unique_id) == fake.module.get_unique_id()
    # UNIQUE_ID has bytes > 127, which only fit a signed char as negative values
    results = run_fake_group(fake, lambda comm: comm.all_gather_ints([comm.rank]))
    assert results == {0: [[0], [1]], 1: [[0], [1]]}


def test_fake_nccl_all_to_all_moves_uneven_bf16_rows_with_one_send_and_recv_per_busy_peer(monkeypatch):
    fake = FakeNccl(3)
    fake.install(monkeypatch)
    counts = {0: [2, 0, 3], 1: [1, 4, 0], 2: [0, 2, 5]}  # counts[src][dst]; rank 1 sends rank 2 nothing

    def body(comm):
        r = comm.rank
        send = torch.cat([torch.full((n, 5), 10.0 * r + d) for d, n in enumerate(counts[r])]).bfloat16()
        recv_counts = [counts[s][r] for s in range(3)]
        received = comm.all_to_all(send, counts[r], recv_counts, label="layer 0 dispatch")
        return comm._wait(received, "test")

    results = run_fake_group(fake, body)
    for r in range(3):
        expected = torch.cat([torch.full((counts[s][r], 5), 10.0 * s + r) for s in range(3)]).bfloat16()
        assert torch.equal(results[r], expected)
    check_call_plan(fake)
    # rank 1 -> 2 carries nothing, so neither side posts a transfer for it (beyond the init warm-up)
    assert [c[2] for c in fake.calls[1] if c[:2] == ("send", 2)] == [1]
    assert fake.destroyed == {0, 1, 2} and not fake.aborted


def test_fake_nccl_small_collectives_agree_on_every_rank(monkeypatch):
    fake = FakeNccl(3)
    fake.install(monkeypatch)

    def body(comm):
        comm.barrier()
        return comm.all_gather_ints([comm.rank, 7]), comm.all_reduce_ints([comm.rank, -comm.rank], "min")

    for gathered, reduced in run_fake_group(fake, body).values():
        assert gathered == [[0, 7], [1, 7], [2, 7]] and reduced == [0, -2]


def test_ep_moe_over_fake_nccl_equals_the_single_rank_model(monkeypatch, tmp_path):
    fake = FakeNccl(4)
    fake.install(monkeypatch)
    reference = gptoss.load_model(gptoss.write_random_checkpoint(tmp_path / "ckpt", EP_CONFIG, seed=11),
                                  dtype=torch.float32)
    placement = ExpertPlacement.contiguous(EP_CONFIG.num_local_experts, 4)
    models = [copy.deepcopy(reference) for _ in range(4)]
    gen = torch.Generator().manual_seed(0)
    token_ids = [torch.randint(0, EP_CONFIG.vocab_size, (n,), generator=gen) for n in (6, 0, 11, 2)]

    def body(comm):
        apply_expert_parallel(models[comm.rank], comm, placement)
        return models[comm.rank](token_ids[comm.rank])

    results = run_fake_group(fake, body)
    for r in range(4):
        torch.testing.assert_close(results[r], reference(token_ids[r]), rtol=0, atol=2e-5)
    check_call_plan(fake)


def test_fake_nccl_missing_peer_times_out_aborts_and_names_the_operation(monkeypatch):
    fake = FakeNccl(3)
    fake.install(monkeypatch)
    release = threading.Event()

    def body(comm):
        if comm.rank == 1:  # joins, then never arrives at the next collective
            release.wait(30)
            return None
        try:
            comm.exchange_counts(torch.ones(3, 2, dtype=torch.int64), label="layer 0 counts")
        finally:
            if fake.aborted >= {0, 2}:
                release.set()

    results = run_fake_group(fake, body, timeout_s=1.0)
    for rank in (0, 2):
        error = results[rank]
        assert isinstance(error, CommunicatorTimeout), error
        assert "all_to_all #3 (layer 0 counts) did not complete within 1.0 s" in str(error)  # #0-2: warm-up
        assert f"ranks {[r for r in range(3) if r != rank]}" in str(error)
    assert fake.aborted == {0, 2}
    aborts = [(rank, device, thread) for rank in (0, 2) for call, device, thread in fake.devices[rank] if call == "abort"]
    assert aborts == [(0, 0, "nccl-watchdog-rank0"), (2, 2, "nccl-watchdog-rank2")]
    check_call_plan(fake, all_matched=False)  # rank 1 never posted its side


def test_fake_nccl_init_times_out_when_a_rank_never_joins(monkeypatch):
    fake = FakeNccl(2)
    fake.install(monkeypatch)
    results = run_fake_group(fake, lambda comm: None, timeout_s=0.5, ranks=[0])
    assert isinstance(results[0], CommunicatorTimeout) and results[0].op == "init"


def test_fake_nccl_watchdog_never_aborts_under_a_call_in_flight_and_the_call_aborts_on_its_way_out(monkeypatch):
    fake = FakeNccl(2)
    fake.install(monkeypatch)
    comms = {}

    def body(comm):
        if comm.rank == 1:  # joins, then never arrives
            return None
        comms[0] = comm
        # A blocking ncclGroupEnd that outlives the deadline: it returns only once the watchdog gave up on it.
        fake.inject(0, "groupEnd", fake.num_calls[(0, "groupEnd")], block_until=lambda: comms[0].broken)
        comm.all_to_all(torch.zeros(2, 4), [1, 1], [1, 1], label="layer 0 dispatch")

    results = run_fake_group(fake, body, timeout_s=0.5)
    assert isinstance(results[0], CommunicatorTimeout), results[0]
    assert "(layer 0 dispatch) did not complete within 0.5 s (still being enqueued)" in str(results[0])
    assert fake.used_after_free == [] and fake.aborted == {0}


def test_fake_nccl_close_aborts_when_an_operation_is_unfinished_and_destroys_when_clean(monkeypatch):
    fake = FakeNccl(2)
    fake.install(monkeypatch)

    def body(comm):
        if comm.rank == 0:  # returns before its data arrived (stream-ordered), and rank 1 never sends it
            comm.all_to_all(torch.zeros(2, 4), [1, 1], [1, 1])

    results = run_fake_group(fake, body, stream_ordered=True)
    assert results == {0: None, 1: None}
    assert fake.aborted == {0} and fake.destroyed == {1} and fake.used_after_free == []


def test_fake_nccl_close_after_a_failure_aborts(monkeypatch):
    fake = FakeNccl(2)
    fake.install(monkeypatch)

    def body(comm):
        if comm.rank == 0:
            fake.inject(0, "allReduce", fake.num_calls[(0, "allReduce")], error=FakeNcclError("remote error"))
            with pytest.raises(CommunicatorError, match=r"barrier #\d+ failed: remote error"):
                comm.barrier()

    assert run_fake_group(fake, body) == {0: None, 1: None}
    assert 0 in fake.aborted and 0 not in fake.destroyed and fake.used_after_free == []


def test_fake_nccl_error_raised_mid_enqueue_breaks_the_communicator_at_once_and_leaves_no_stuck_entry(monkeypatch):
    fake = FakeNccl(2)
    fake.install(monkeypatch)
    after = {}

    def body(comm):
        if comm.rank == 1:
            return None
        # The send to rank 1 is posted, then the receive raises: half a group reached NCCL.
        fake.inject(0, "recv", fake.num_calls[(0, "recv")], error=TypeError("an integer is required"))
        try:
            comm.all_to_all(torch.zeros(2, 4), [1, 1], [1, 1], label="layer 0 dispatch")
        finally:
            after["entries"] = [(p.op, p.event) for p in comm._watchdog._pending]
            after["aborted"] = 0 in fake.aborted
            try:
                comm.barrier()
            except CommunicatorError as e:
                after["next"] = e

    results = run_fake_group(fake, body, timeout_s=30.0)  # nothing may wait for this deadline
    assert isinstance(results[0], TypeError)
    assert after["aborted"] and all(event is not None for _, event in after["entries"]), after
    assert not isinstance(after["next"], CommunicatorTimeout)
    assert "(layer 0 dispatch) failed: TypeError: an integer is required" in str(after["next"])
    check_call_plan(fake, all_matched=False)  # the group was closed all the same


def test_fake_nccl_every_nccl_and_cuda_call_runs_on_the_ranks_device_whatever_the_thread(monkeypatch):
    fake = FakeNccl(2)
    fake.install(monkeypatch)

    def body(comm):
        comm.exchange_counts(torch.ones(2, 3, dtype=torch.int64), label="layer 0 counts")
        comm.all_reduce_ints([comm.rank], "max")
        checked = lambda: any(call == "check_async_error" for call, _, _ in fake.devices[comm.rank])  # noqa: E731
        with fake.cond:  # the watchdog thread's asynchronous error check, at its next poll
            assert fake.cond.wait_for(checked, timeout=10)

    assert run_fake_group(fake, body) == {0: None, 1: None}
    for rank in range(2):
        threads = {thread for _, _, thread in fake.devices[rank]}
        assert {f"nccl-init-rank{rank}", f"nccl-watchdog-rank{rank}"} < threads  # and the caller's
        wrong = [(call, device, thread) for call, device, thread in fake.devices[rank] if device != rank]
        assert wrong == [], f"rank {rank}: calls made with another device current"


def test_importing_parallel_does_not_import_cupy():
    code = "import parallel, sys; assert 'cupy' not in sys.modules and 'ray' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1], timeout=120)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
def test_real_nccl_ep_group_on_two_gpus_equals_the_single_rank_model(tmp_path):
    pytest.importorskip("cupy")
    checkpoint = str(gptoss.write_random_checkpoint(tmp_path / "ckpt", EP_CONFIG, seed=13))
    gen = torch.Generator().manual_seed(0)
    moe_inputs = [torch.randn(n, EP_CONFIG.hidden_size, generator=gen) for n in (5, 0)]
    token_ids = [torch.randint(0, EP_CONFIG.vocab_size, (n,), generator=gen) for n in (7, 0)]
    unique_id = make_nccl_unique_id()  # this process stays alive while the ranks join
    results = run_spawned(nccl_ep_worker, 2, unique_id, checkpoint, moe_inputs, token_ids, timeout_s=300)
    single = gptoss.load_model(checkpoint, dtype=torch.float32, device="cuda:0")
    for r, result in enumerate(results):
        expected_rows = torch.cat([torch.full((s + r, 3), 100.0 * s + r) for s in range(2)])
        assert torch.equal(result["exchanged"], expected_rows)
        assert result["gathered"] == [[0, 0], [1, 10]] and result["reduced"] == [1, 0]
        torch.testing.assert_close(result["moe_out"], single.layers[0].mlp(moe_inputs[r].cuda()).cpu(),
                                   rtol=0, atol=1e-4)
        torch.testing.assert_close(result["logits"], single(token_ids[r]).cpu(), rtol=0, atol=1e-4)
