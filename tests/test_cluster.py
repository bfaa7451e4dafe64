"""EP groups on a simulated two-node Ray cluster (fake GPUs, CPU compute, gloo on loopback)."""

import asyncio
import os
import signal
import time
from pathlib import Path

import pytest
import ray
import torch

import gptoss
from cluster import EPGroup, GroupConfig, GroupDrainingError, GroupFailedError, PlacementError
from engine.config import EngineConfig
from engine.engine import Engine
from engine.sampling_params import SamplingParams
from gptoss.errors import InvalidRequestError

ENGINE = EngineConfig(num_kv_blocks=96, max_num_seqs=8, max_num_batched_tokens=128, block_size=8)
GREEDY = SamplingParams(max_tokens=6, temperature=0.0)
# Prompts of mixed lengths; a window of 16 on the sliding layers so they are crossed.
MODEL = gptoss.get_preset("tiny").replace(sliding_window=16)


def make_prompts(n: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 199998, (int(torch.randint(3, 40, (1,), generator=gen)),), generator=gen).tolist()
            for _ in range(n)]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return gptoss.write_random_checkpoint(tmp_path_factory.mktemp("cluster"), MODEL, seed=5)


@pytest.fixture(scope="module")
def reference(checkpoint):
    """A bare engine in this process: the ground truth for the groups' greedy outputs."""
    engine = Engine(gptoss.load_model(checkpoint, dtype=torch.float32), ENGINE)

    def run(prompts, sampling=GREEDY):
        return [list(c.token_ids) for c in engine.generate(prompts, sampling)]

    return run


def group_config(checkpoint, num_ranks, **kw) -> GroupConfig:
    return GroupConfig(checkpoint=str(checkpoint), num_ranks=num_ranks, dtype="float32", engine=ENGINE,
                       collective_timeout_s=5.0, placement_timeout_s=20.0, **kw)


@pytest.fixture(scope="module")
def group4(ray_cluster, event_loop_thread, checkpoint):
    group = EPGroup(group_config(checkpoint, 4, name="g4"))
    group.progress_reports = []
    event_loop_thread(group.start(on_progress=group.progress_reports.append))
    yield group
    event_loop_thread(group.shutdown())


async def collect(group, request_id, prompt, sampling=GREEDY):
    tokens, last = [], None
    async for out in group.generate(request_id, prompt, sampling):
        tokens += out.new_token_ids
        last = out
    return tokens, last


async def collect_all(group, prompts, prefix, sampling=GREEDY):
    results = await asyncio.gather(*(collect(group, f"{prefix}{i}", p, sampling) for i, p in enumerate(prompts)))
    return [tokens for tokens, _ in results], [last for _, last in results]


def rank_stats(run, group):
    return run(group.stats()).ranks


def test_four_ranks_across_two_nodes_give_the_single_engine_outputs(group4, event_loop_thread, reference):
    run = event_loop_thread
    prompts = make_prompts(10)
    before = [r.engine.num_scheduled_tokens for r in rank_stats(run, group4)]
    got, lasts = run(collect_all(group4, prompts, "spread"))
    assert got == reference(prompts)
    assert all(last.finish_reason == "length" and last.num_output_tokens == 6 for last in lasts)
    # Requests went to every rank, and the ranks live on both nodes.
    after = [r.engine.num_scheduled_tokens for r in rank_stats(run, group4)]
    assert all(a > b for a, b in zip(after, before, strict=True))
    stats = run(group4.stats())
    assert len({r.node_id for r in stats.ranks}) == 2
    assert stats.num_open_streams == 0 and stats.token_delivery_p50_ms > 0
    assert sum(map(sum, stats.expert_token_counts)) > 0
    assert sum(r.num_output_tokens for r in stats.ranks) >= 60 and stats.output_tokens_per_s > 0


def test_start_up_reported_every_rank_loading_its_share(group4, event_loop_thread):
    last = group4.progress_reports[-1]
    assert [p.stage for p in last] == ["ready"] * 4
    assert all(p.tensors_done == p.tensors_total > 0 for p in last)
    # Each rank holds only its quarter of the 8 experts, contiguously.
    stats = event_loop_thread(group4.stats())
    assert [r.expert_ids for r in stats.ranks] == [(0, 1), (2, 3), (4, 5), (6, 7)]


def test_work_on_one_rank_only_keeps_the_others_in_lockstep(group4, event_loop_thread, reference):
    run = event_loop_thread
    before = rank_stats(run, group4)
    prompts = make_prompts(3, seed=1)
    got = [run(collect(group4, f"alone{i}", p))[0] for i, p in enumerate(prompts)]  # one at a time
    assert got == reference(prompts)
    after = rank_stats(run, group4)
    busy = [a.engine.num_scheduled_tokens - b.engine.num_scheduled_tokens for a, b in zip(after, before, strict=True)]
    idle_ranks = [r for r, n in enumerate(busy) if n == 0]
    assert idle_ranks, f"expected some ranks without work, tokens per rank {busy}"
    for r in idle_ranks:  # they stepped with zero tokens, as many times as the busy ranks
        assert after[r].num_empty_steps > before[r].num_empty_steps
        assert after[r].num_steps - before[r].num_steps == after[0].num_steps - before[0].num_steps


def test_a_prompt_sharing_a_served_prefix_goes_to_the_rank_that_caches_it(group4, event_loop_thread):
    """Ranks 0 and 1 busy, the first turn lands on rank 2; once rank 1 is free again the least busy
    rank would be 1, but the second turn follows its prefix to rank 2 and finds it cached."""
    run = event_loop_thread
    shared = make_prompts(1, seed=7)[0] + make_prompts(1, seed=8)[0] + list(range(1000, 1030))
    long = SamplingParams(max_tokens=400, temperature=0.0)

    async def scenario():
        holders = [asyncio.ensure_future(collect(group4, f"hold{i}", p, long))
                   for i, p in enumerate(make_prompts(2, seed=9))]
        await asyncio.sleep(0)  # both holders picked their rank (0, then 1)
        _, first = await collect(group4, "turn1", shared + [1, 2, 3])
        await group4.abort("hold1")
        await holders[1]
        before = await group4.stats()
        _, second = await collect(group4, "turn2", shared + [4, 5, 6, 7])
        after = await group4.stats()
        await group4.abort("hold0")
        await holders[0]
        return first, second, before, after

    first, second, before, after = run(scenario())
    assert first.num_cached_tokens == 0
    assert second.num_cached_tokens >= 8 * (len(shared) // 8) - 8  # the shared full blocks (window aside)
    worked = [a.engine.num_scheduled_tokens - b.engine.num_scheduled_tokens
              for a, b in zip(after.ranks, before.ranks, strict=True)]
    assert worked[2] > 0 and worked[1] == worked[3] == 0, worked


def process_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100  # utime + stime, in clock ticks of 1/100 s


def test_an_idle_group_uses_almost_no_cpu(group4, event_loop_thread):
    pids = [r.pid for r in event_loop_thread(group4.stats()).ranks]
    time.sleep(1.0)  # let the idle backoff settle
    start = [process_cpu_s(p) for p in pids]
    wall = 3.0
    time.sleep(wall)
    used = [process_cpu_s(p) - s for p, s in zip(pids, start, strict=True)]
    # A spinning rank would use ~1 s per second; an idle one re-agrees a few times a second.
    assert max(used) < 0.1 * wall, f"CPU seconds per rank over {wall} s idle: {used}"


def test_a_bad_request_is_rejected_and_others_finish(group4, event_loop_thread, reference):
    async def both():
        good = asyncio.create_task(collect(group4, "good", [1, 2, 3, 4]))
        with pytest.raises(InvalidRequestError, match="prompt_token_ids") as info:
            await collect(group4, "bad", [1, 999_999])
        return info.value.param, (await good)[0]

    param, tokens = event_loop_thread(both())
    assert param == "prompt_token_ids"
    assert tokens == reference([[1, 2, 3, 4]])[0]


def test_leaving_a_stream_early_aborts_the_request(group4, event_loop_thread, reference):
    prompt, long = [5, 6, 7], SamplingParams(max_tokens=400, temperature=0.0)
    assert len(reference([prompt], long)[0]) == 400  # left alone, it would run to max_tokens

    async def leave_early():
        before = sum(r.num_output_tokens for r in (await group4.stats()).ranks)
        agen = group4.generate("leaver", prompt, long)
        await agen.__anext__()
        await agen.aclose()
        for _ in range(200):  # the abort reaches the rank within a few steps
            stats = await group4.stats()
            if stats.num_running == 0 and stats.num_waiting == 0:
                break
            await asyncio.sleep(0.05)
        return stats, sum(r.num_output_tokens for r in stats.ranks) - before

    stats, generated = event_loop_thread(leave_early())
    assert stats.num_running == 0 and stats.num_kv_blocks_used == 0
    assert generated < 100, f"the request went on after its caller left: {generated} tokens"


def test_forwarded_outputs_come_in_order_and_a_forward_that_raises_ends_the_request(
        group4, event_loop_thread, reference):
    prompts = make_prompts(4, seed=3)
    long = SamplingParams(max_tokens=400, temperature=0.0)

    async def forwarded(request_id, prompt):
        outputs = []
        lasts = [out async for out in group4.generate(request_id, prompt, GREEDY, forward=outputs.append)]
        return outputs, lasts

    async def forward_fails():
        before = sum(r.num_output_tokens for r in (await group4.stats()).ranks)

        def forward(output):
            raise ConnectionResetError("the channel broke")

        with pytest.raises(ConnectionResetError):
            async for _ in group4.generate("fails", [5, 6, 7], long, forward=forward):
                pass
        for _ in range(200):
            stats = await group4.stats()
            if stats.num_running == 0 and stats.num_waiting == 0:
                break
            await asyncio.sleep(0.05)
        return stats, sum(r.num_output_tokens for r in stats.ranks) - before

    async def all_forwarded():
        return await asyncio.gather(*(forwarded(f"fwd{i}", p) for i, p in enumerate(prompts)))

    results = event_loop_thread(all_forwarded())
    for (outputs, lasts), expected in zip(results, reference(prompts), strict=True):
        assert len(lasts) == 1 and lasts[0].finish_reason == "length"  # only the last is yielded
        assert all(not o.finished for o in outputs) and {o.request_id for o in outputs} <= {lasts[0].request_id}
        assert [t for o in [*outputs, *lasts] for t in o.new_token_ids] == expected
    stats, generated = event_loop_thread(forward_fails())
    assert stats.num_running == 0 and stats.num_kv_blocks_used == 0
    assert generated < 100, f"the request went on after its forward raised: {generated} tokens"


async def read_until_aborted(group, request_id, prompt):
    """Streams a long request, aborting it once its first token is out; returns (tokens, last output)."""
    tokens, last = [], None
    async for out in group.generate(request_id, prompt, SamplingParams(max_tokens=400, temperature=0)):
        if not tokens:
            asyncio.get_running_loop().create_task(group.abort(request_id))
        tokens += out.new_token_ids
        last = out
    return tokens, last


def test_abort_ends_a_stream_another_task_reads(group4, event_loop_thread):
    tokens, last = event_loop_thread(read_until_aborted(group4, "to-abort", [4, 5, 6]))
    assert last.finish_reason == "abort" and last.request_id == "to-abort" and len(tokens) < 100


def test_an_abort_that_overtakes_its_request_still_cancels_it(ray_cluster, checkpoint):
    # Ray does not order the calls of an async actor: the abort may reach the rank first.
    from cluster.rank import RankActor, RankOutput, RankRequest

    rank = ray.remote(RankActor).options(num_cpus=0).remote(0, group_config(checkpoint, 1, name="early"))
    try:
        ray.get(rank.load.remote(None, None), timeout=60)
        ray.get(rank.begin.remote())
        ray.get(rank.abort.remote("r#0"))
        ray.get(rank.add_requests.remote([RankRequest("r#0", [1, 2, 3], SamplingParams(max_tokens=400, temperature=0))]))
        output_stream = rank.stream_outputs.remote()
        ready, _ = ray.wait([output_stream], timeout=30)
        assert ready, "the rank sent no outputs within 30 s"
        batch = ray.get(next(output_stream), timeout=30)
        outputs = [item.output for item in batch.items if isinstance(item, RankOutput)]
        assert [(o.request_id, o.finish_reason, o.new_token_ids) for o in outputs] == [("r#0", "abort", ())]
        stats = ray.get(rank.stats.remote())
        assert stats.engine.num_running == stats.engine.num_waiting == stats.num_output_tokens == 0
    finally:
        ray.kill(rank)


def test_unsatisfiable_placement_names_the_missing_resources(ray_cluster, event_loop_thread, checkpoint):
    group = EPGroup(GroupConfig(checkpoint=str(checkpoint), num_ranks=8, device="cuda", placement_timeout_s=2.0))
    with pytest.raises(PlacementError, match=r"missing \{'GPU': 2\.0\}"):
        event_loop_thread(group.start(), timeout_s=30)
    assert group.health().state == "failed"


def test_killing_a_rank_fails_every_request_of_the_group_and_restart_recovers(
        ray_cluster, event_loop_thread, checkpoint, reference, group4):
    run = event_loop_thread
    group = EPGroup(group_config(checkpoint, 2, name="g2-kill"))
    run(group.start())
    try:
        long = SamplingParams(max_tokens=500, temperature=0.0)

        async def kill_mid_generation():
            started = asyncio.Event()

            async def consume(i):
                async for _ in group.generate(f"doomed{i}", [10 + i, 11, 12], long):
                    started.set()

            tasks = [asyncio.create_task(consume(i)) for i in range(4)]
            await started.wait()
            os.kill((await group.stats()).ranks[1].pid, signal.SIGKILL)
            return await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), timeout=60)

        results = run(kill_mid_generation())
        assert all(isinstance(r, GroupFailedError) for r in results), results
        health = group.health()
        assert health.state == "failed" and "rank" in health.error
        with pytest.raises(GroupFailedError, match="restart it"):
            run(collect(group, "after", [1, 2]))
        # Another group keeps serving meanwhile.
        assert run(collect(group4, "bystander", [1, 2, 3]))[0] == reference([[1, 2, 3]])[0]

        run(group.start())  # straight from failed: start() clears what the failed group left
        assert group.health().ok
        prompts = make_prompts(3, seed=2)
        assert run(collect_all(group, prompts, "reborn"))[0] == reference(prompts)
    finally:
        run(group.shutdown())


def test_drain_finishes_open_requests_then_refuses_new_ones(ray_cluster, event_loop_thread, checkpoint):
    run = event_loop_thread
    group = EPGroup(group_config(checkpoint, 1, name="g1-drain"))
    run(group.start())
    pg_id = run(group.stats()).placement_group_id

    async def drain_while_busy():
        task = asyncio.create_task(collect(group, "inflight", [3, 4, 5], SamplingParams(max_tokens=20, temperature=0)))
        await asyncio.sleep(0)
        drain = asyncio.create_task(group.drain(timeout_s=60))
        await asyncio.sleep(0.01)
        with pytest.raises(GroupDrainingError):
            await collect(group, "late", [1])
        await drain
        return await task

    tokens, last = run(drain_while_busy())
    assert len(tokens) == 20 and last.finish_reason == "length"
    assert group.health().state == "stopped"
    assert ray.util.placement_group_table()[pg_id]["state"] == "REMOVED"  # the bundles went back


def test_drain_deadline_aborts_what_is_still_running(ray_cluster, event_loop_thread, checkpoint):
    run = event_loop_thread
    group = EPGroup(group_config(checkpoint, 1, name="g1-deadline"))
    run(group.start())

    async def drain_too_soon():
        first = asyncio.Event()

        async def slow():
            tokens, last = [], None
            async for out in group.generate("slow", [3, 4, 5], SamplingParams(max_tokens=400, temperature=0)):
                first.set()
                tokens += out.new_token_ids
                last = out
            return tokens, last

        task = asyncio.create_task(slow())
        await first.wait()
        await group.drain(timeout_s=0.2)
        return await asyncio.wait_for(task, timeout=30)

    tokens, last = run(drain_too_soon())
    assert last.finish_reason == "abort" and len(tokens) < 500
    assert group.health().state == "stopped"


@ray.remote(num_cpus=0)
class _Replica:
    """Stands in for a Serve replica that declared its group's bundles in its own placement group."""

    def __init__(self, config: GroupConfig):
        self.group = EPGroup(config)

    async def start_and_generate(self, prompt):
        await self.group.start()
        tokens, _ = await collect(self.group, "nested", prompt)
        return tokens, (await self.group.stats()).placement_group_id

    async def shutdown(self):
        await self.group.shutdown()


def test_a_group_inside_a_callers_placement_group_uses_its_bundles(ray_cluster, checkpoint, reference):
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    # Bundle 0 for the replica itself, then one per rank, as a Serve deployment would declare them.
    pg = placement_group([{"CPU": 1}, {"CPU": 1, "GPU": 1}, {"CPU": 1, "GPU": 1}], strategy="PACK")
    ray.get(pg.ready(), timeout=30)
    try:
        replica = _Replica.options(scheduling_strategy=PlacementGroupSchedulingStrategy(
            pg, placement_group_bundle_index=0, placement_group_capture_child_tasks=True),
        ).remote(group_config(checkpoint, 2, name="nested"))
        tokens, pg_id = ray.get(replica.start_and_generate.remote([7, 8, 9]), timeout=120)
        assert tokens == reference([[7, 8, 9]])[0]
        assert pg_id == pg.id.hex()
        ray.get(replica.shutdown.remote(), timeout=60)
        # The group used the caller's bundles and left the placement group to its owner.
        assert ray.util.placement_group_table(pg)["state"] == "CREATED"
    finally:
        remove_placement_group(pg)


def placement_groups_named(prefix: str) -> dict[str, str]:
    """State of every placement group whose name starts with `prefix`, by id."""
    return {pg_id: info["state"] for pg_id, info in ray.util.placement_group_table().items()
            if info["name"].startswith(prefix)}


async def until(condition, what: str, timeout_s: float = 30.0) -> None:
    """Waits (bounded) until `condition()` holds."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


def test_shutdown_during_start_ends_the_start_and_releases_its_bundles(ray_cluster, event_loop_thread, checkpoint):
    # 8 GPU bundles never fit the 6 fake GPUs: start() waits for placement until it is shut down.
    group = EPGroup(GroupConfig(checkpoint=str(checkpoint), num_ranks=8, device="cuda", placement_timeout_s=600,
                                name="shut-in-start"))

    async def scenario():
        start = asyncio.create_task(group.start())
        await until(lambda: placement_groups_named("shut-in-start"), "the placement group")
        stats = await group.stats()  # answers while starting
        await group.shutdown()
        with pytest.raises(GroupDrainingError, match="shut down while starting"):
            await start
        return stats

    stats = event_loop_thread(scenario(), timeout_s=60)
    assert stats.state == "starting" and stats.ranks == ()
    assert group.health().state == "stopped"
    assert set(placement_groups_named("shut-in-start").values()) == {"REMOVED"}


def test_a_cancelled_start_leaves_nothing_reserved_and_the_next_start_works(
        ray_cluster, event_loop_thread, checkpoint, reference):
    group = EPGroup(group_config(checkpoint, 1, name="cancelled-start"))

    async def cancel_then_start():
        start = asyncio.create_task(group.start())
        await until(lambda: placement_groups_named("cancelled-start"), "the placement group")
        start.cancel()
        with pytest.raises(asyncio.CancelledError):
            await start
        states = set(placement_groups_named("cancelled-start").values())
        await group.start()
        tokens, _ = await collect(group, "after-cancel", [1, 2, 3])
        return states, tokens

    try:
        states, tokens = event_loop_thread(cancel_then_start(), timeout_s=120)
    finally:  # a group left up would hold its bundles (fake GPUs) from the modules after this one
        event_loop_thread(group.shutdown())
    assert states == {"REMOVED"}
    assert tokens == reference([[1, 2, 3]])[0]


def test_overlapping_restarts_leave_one_healthy_group_holding_one_placement_group(
        ray_cluster, event_loop_thread, checkpoint, reference):
    group = EPGroup(group_config(checkpoint, 1, name="twice-restarted"))

    async def restart_twice():
        await group.start()
        await asyncio.gather(group.restart(), group.restart())
        return await collect(group, "after-restarts", [4, 5, 6])

    try:
        tokens, _ = event_loop_thread(restart_twice(), timeout_s=180)
        assert group.health().ok and tokens == reference([[4, 5, 6]])[0]
        states = list(placement_groups_named("twice-restarted").values())
        assert states.count("CREATED") == 1 and states.count("REMOVED") == 2, states
    finally:
        event_loop_thread(group.shutdown())


def test_a_frozen_rank_fails_its_group_even_when_it_is_alone(ray_cluster, event_loop_thread, checkpoint):
    # G=1 has no collective that could time out: only the group's step watchdog can notice.
    group = EPGroup(group_config(checkpoint, 1, name="g1-frozen", step_timeout_s=2.0))
    event_loop_thread(group.start())
    pid = event_loop_thread(group.stats()).ranks[0].pid

    async def freeze_mid_stream():
        async for _ in group.generate("frozen", [1, 2, 3], SamplingParams(max_tokens=400, temperature=0)):
            os.kill(pid, signal.SIGSTOP)

    try:
        with pytest.raises(GroupFailedError, match="heartbeat|stuck"):
            event_loop_thread(freeze_mid_stream(), timeout_s=60)
        assert group.health().state == "failed"
    finally:
        os.kill(pid, signal.SIGCONT)
        event_loop_thread(group.shutdown())


def test_ranks_that_do_not_start_in_time_are_named(ray_cluster, event_loop_thread, checkpoint):
    group = EPGroup(group_config(checkpoint, 2, name="slow-start", start_timeout_s=0.001))
    with pytest.raises(GroupFailedError, match=r"ranks \[[0-9, ]+\] did not start within start_timeout_s"):
        event_loop_thread(group.start(), timeout_s=60)
    assert set(placement_groups_named("slow-start").values()) == {"REMOVED"}


class _FakeRank:
    """A rank handle whose `add_requests` calls are held until the test answers them."""

    def __init__(self):
        self.calls: list[tuple[list, asyncio.Future]] = []
        self.wakes = 0
        self.add_requests = self.wake = self

    def remote(self, requests=None):
        if requests is None:
            self.wakes += 1
            return None
        future = asyncio.get_running_loop().create_future()
        self.calls.append(([r.request_id for r in requests], future))
        return future


def test_a_rank_gets_the_requests_that_arrive_during_a_call_in_one_next_call():
    from cluster.group import _RankRequests
    from cluster.rank import RankRequest

    async def scenario():
        rank, peer = _FakeRank(), _FakeRank()
        requests = _RankRequests(rank, [peer])
        added = {}

        def add(request_id: str) -> asyncio.Task:
            added[request_id] = asyncio.create_task(requests.add(RankRequest(request_id, [1, 2], GREEDY)))
            return added[request_id]

        add("a")
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert [ids for ids, _ in rank.calls] == [["a"]]  # the first goes at once
        for request_id in "bcd":
            add(request_id)
        await asyncio.sleep(0)
        added["c"].cancel()  # its caller left before it was sent: left out of the call
        rank.calls[0][1].set_result(None)
        await added["a"]
        await asyncio.sleep(0)
        assert [ids for ids, _ in rank.calls] == [["a"], ["b", "d"]]
        assert peer.wakes == 1 and rank.wakes == 0  # the other ranks, once per call
        rank.calls[1][1].set_exception(ray.exceptions.RayActorError())
        for request_id in "bd":
            with pytest.raises(ray.exceptions.RayActorError):
                await added[request_id]
        assert added["c"].cancelled()
        add("e")  # a failed call does not stop the next one
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        rank.calls[2][1].set_result(None)
        await added["e"]
        assert [ids for ids, _ in rank.calls][2:] == [["e"]] and peer.wakes == 2

    asyncio.run(scenario())


def test_a_start_cancelled_as_its_bundles_are_placed_is_cancelled():
    """Python 3.11's asyncio.wait_for returns a result that comes in the same turn as a cancel, dropping
    the cancel: a start cancelled then would go on and bring its group up."""
    from types import SimpleNamespace

    from cluster.placement import wait_placed

    async def cancel_as_placed():
        placed = asyncio.get_running_loop().create_future()
        reservation = SimpleNamespace(placement_group=SimpleNamespace(ready=lambda: placed), bundle_indices=[0])
        waiting = asyncio.create_task(wait_placed(reservation, {"CPU": 1.0}, timeout_s=30))
        await asyncio.sleep(0)  # now waiting on the placement
        placed.set_result(None)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting

    asyncio.run(cancel_as_placed())
