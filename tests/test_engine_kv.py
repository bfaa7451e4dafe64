"""engine/: block pool, KV cache manager and scheduler on their own (no model)."""

from __future__ import annotations

import random

import pytest

from engine.block_pool import BlockPool, KVBlock
from engine.config import EngineConfig
from engine.kv_cache_manager import KVCacheGroup, KVCacheManager, kv_cache_groups
from engine.request import Request, RequestStatus
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler
from tests.engine_helpers import WINDOW_CONFIG

FULL = KVCacheGroup((1,), None)
SLIDING = KVCacheGroup((0, 2), 8)


def make_requests(lengths, max_tokens: int = 8, start: int = 0) -> list[Request]:
    """Requests with distinct prompts (token i of request r is 1000 * r + i), arriving in order."""
    params = SamplingParams.greedy(max_tokens=max_tokens, stop_token_ids=())
    return [Request(f"r{r}", [1000 * r + i for i in range(n)], params, max_tokens, r)
            for r, n in enumerate(lengths, start=start)]


def make_manager(num_blocks: int = 64, groups=(FULL, SLIDING), budget: int = 16) -> KVCacheManager:
    return KVCacheManager(groups, num_blocks, 4, True, budget)


def finish_step(scheduler: Scheduler, output, token: int = 7) -> list:
    """Pretends the model ran: every sampled request gets `token`."""
    return scheduler.update(output, [token] * sum(1 for r in output.requests if r.sample), None)


# --- block pool ----------------------------------------------------------------------------------


def test_block_pool_evicts_blocks_without_a_prefix_first_then_least_recently_used():
    pool = BlockPool(6, enable_caching=True)
    a, b, c, d = pool.allocate(4)
    pool.cache_block(a, (0, b"a"))
    pool.cache_block(b, (0, b"b"))
    pool.free([a])
    pool.free([b, c])  # c holds no prefix: first out
    assert pool.num_free_blocks == 4
    assert [blk.block_id for blk in pool.allocate(2)] == [c.block_id, 5]
    assert pool.get_cached_block((0, b"a")) is a
    assert pool.allocate(1) == [a] and pool.get_cached_block((0, b"a")) is None  # evicted: a was freed first
    assert pool.get_cached_block((0, b"b")) is b


def test_block_pool_touching_a_cached_free_block_takes_it_off_the_free_list():
    pool = BlockPool(4, enable_caching=True)
    [a] = pool.allocate(1)
    pool.cache_block(a, (1, b"x"))
    pool.free([a])
    assert pool.num_free_blocks == 3
    pool.touch([a])
    assert a.ref_cnt == 1 and pool.num_free_blocks == 2
    pool.touch([a])
    pool.free([a])
    assert a.ref_cnt == 1 and pool.num_free_blocks == 2
    assert pool.null_block not in pool.allocate(2)


def test_block_pool_counts_its_cached_free_blocks_through_any_sequence_of_moves():
    rng = random.Random(0)
    pool = BlockPool(12, enable_caching=True)
    held: list[KVBlock] = []
    for step in range(3000):
        move = rng.randrange(4)
        if move == 0 and pool.num_free_blocks:
            held += pool.allocate(rng.randint(1, min(3, pool.num_free_blocks)))
        elif move == 1 and held:
            pool.free([held.pop(rng.randrange(len(held)))])
        elif move == 2 and held:
            pool.cache_block(rng.choice(held), (0, bytes([rng.randrange(6)])))
        elif move == 3:
            free_cached = [b for b in pool.blocks[1:] if b.ref_cnt == 0 and b.cache_key is not None]
            if free_cached:
                block = rng.choice(free_cached)
                pool.touch([block])  # a prefix-cache hit on a free block
                held.append(block)
        expected = sum(1 for b in pool.blocks[1:] if b.ref_cnt == 0 and b.cache_key is not None)
        assert pool.get_num_cached_free_blocks() == expected, step


# --- KV cache manager ----------------------------------------------------------------------------


def test_gpt_oss_layers_split_into_a_full_and_a_sliding_group():
    assert kv_cache_groups(WINDOW_CONFIG) == (KVCacheGroup((1,), None), KVCacheGroup((0, 2), 8))


def test_sliding_group_frees_blocks_its_window_no_longer_sees():
    kv = make_manager()
    [req] = make_requests([30])
    assert kv.allocate_slots(req, 30)
    req.num_computed_tokens = 30
    assert kv.get_num_blocks_held("r0") == (8, 8)
    assert kv.allocate_slots(req, 1)  # the query at 30 sees 23..30: blocks 5..7
    assert kv.get_num_blocks_held("r0") == (8, 3)
    assert kv.get_block_ids("r0", 1, 0)[:5] == (0, 0, 0, 0, 0)  # the null block stands in
    kv.free(req)
    assert kv.num_used_blocks == 0


def test_prefix_hit_needs_every_full_block_but_only_the_window_of_sliding_blocks():
    kv = make_manager()
    [first] = make_requests([26])
    assert kv.allocate_slots(first, 26)
    first.num_computed_tokens = 26
    kv.cache_blocks(first)  # 6 full blocks registered in both groups
    kv.free(first)
    second = Request("again", first.token_ids + [1, 2, 3], first.sampling, 4, 1)
    blocks, num_hit = kv.get_computed_blocks(second)
    assert num_hit == 24
    assert [len(b) for b in blocks] == [6, 6]
    assert blocks[1][:4] == [kv.pool.null_block] * 4  # the window of position 24 starts in block 4
    # Evict the sliding group's block 5 (inside the window): the hit falls back to where a window of
    # cached blocks ends (block 4 ends at 20, its window needs blocks 3 and 4).
    del kv.pool._cached[(1, second.block_hashes[5])]
    _, num_hit = kv.get_computed_blocks(second)
    assert num_hit == 20
    # Evicting a block the window of position 20 does not see changes nothing.
    del kv.pool._cached[(1, second.block_hashes[0])]
    assert kv.get_computed_blocks(second)[1] == 20


def test_allocation_fails_without_side_effects_when_the_pool_is_short():
    kv = make_manager(num_blocks=12)
    a, b = make_requests([20, 4])
    assert kv.allocate_slots(a, 20)  # 5 full + 5 sliding blocks of the 11 usable
    assert not kv.allocate_slots(b, 4)  # needs 2
    assert kv.num_used_blocks == 10 and kv.get_num_blocks_held("r1") == (0, 0)
    kv.free(a)
    assert kv.num_used_blocks == 0 and kv.allocate_slots(b, 4)


def test_longest_request_the_pool_can_hold_counts_both_groups():
    kv = make_manager(num_blocks=12, budget=8)
    # sliding: at most ceil((8 - 1 + 8) / 4) + 1 = 5 blocks; 11 usable -> 6 full blocks = 24 tokens
    assert kv.get_max_num_blocks(24) == 11 and kv.get_max_num_tokens(1000) == 24


# --- scheduler -----------------------------------------------------------------------------------


def make_scheduler(num_blocks: int = 64, **config) -> Scheduler:
    cfg = EngineConfig(**({"block_size": 4, "max_num_batched_tokens": 16, "max_num_seqs": 8} | config))
    kv = KVCacheManager((FULL, SLIDING), num_blocks, 4, cfg.enable_prefix_caching, cfg.max_num_batched_tokens)
    return Scheduler(cfg, kv, 1000)


def test_a_long_prompt_never_starves_decodes():
    scheduler = make_scheduler(num_blocks=256)
    for req in make_requests([3, 3, 3]):
        scheduler.add_request(req)
    finish_step(scheduler, scheduler.schedule())  # three short prefills; all decode from now on
    [long] = make_requests([200], start=3)
    scheduler.add_request(long)
    for _ in range(5):
        out = scheduler.schedule()
        sizes = {r.request_id: len(r.token_ids) for r in out.requests}
        assert sizes == {"r0": 1, "r1": 1, "r2": 1, "r3": 13} and out.num_decodes == 3
        assert [r.request_id for r in out.requests][:3] == ["r0", "r1", "r2"]  # decodes first
        finish_step(scheduler, out)


def test_admission_is_first_come_first_served_and_the_head_is_never_overtaken():
    scheduler = make_scheduler(num_blocks=14)
    big, small = make_requests([40, 2])
    scheduler.add_request(big)
    scheduler.add_request(small)
    out = scheduler.schedule()  # 13 usable blocks: big's first chunk of 16 takes 4 + 4 of them
    assert [r.request_id for r in out.requests] == ["r0"]
    assert list(scheduler.waiting) == [small]  # budget spent: small waits its turn


def test_the_newest_request_is_preempted_when_blocks_run_out_and_rejoins_the_queue_head():
    scheduler = make_scheduler(num_blocks=9, max_num_batched_tokens=8)
    old, new = make_requests([12, 12], max_tokens=40)
    scheduler.add_request(old)
    scheduler.add_request(new)
    for _ in range(12):
        finish_step(scheduler, scheduler.schedule())
        if scheduler.num_preemptions:
            break
    assert old.num_preemptions == 0
    assert new.status is RequestStatus.WAITING and new.num_computed_tokens == 0 and new.num_preemptions == 1
    assert scheduler.waiting[0] is new and scheduler.running == [old]
    assert scheduler.num_preemptions == 1


def test_a_preempted_request_is_recomputed_from_its_prompt_and_outputs():
    scheduler = make_scheduler(num_blocks=16, max_num_batched_tokens=8)
    old, new = make_requests([12, 12], max_tokens=40)
    scheduler.add_request(old)
    scheduler.add_request(new)
    while not new.num_preemptions:
        finish_step(scheduler, scheduler.schedule())
    num_outputs = new.num_output_tokens
    assert num_outputs > 0
    scheduler.abort("r0")  # room again
    [item] = scheduler.schedule().requests
    # Its prompt and the outputs it had are recomputed, from the last block the prefix cache still has.
    assert item.request_id == "r1" and new.num_tokens == 12 + num_outputs
    assert item.start_position % 4 == 0 and item.start_position < new.num_tokens
    assert item.token_ids == tuple(new.token_ids[item.start_position:item.start_position + len(item.token_ids)])


@pytest.mark.parametrize("chunked", [True, False], ids=["chunked", "whole"])
def test_prefill_is_chunked_to_the_budget_only_when_chunked_prefill_is_on(chunked):
    scheduler = make_scheduler(enable_chunked_prefill=chunked, max_num_batched_tokens=16, max_num_seqs=4)
    for req in make_requests([10, 10]):
        scheduler.add_request(req)
    out = scheduler.schedule()
    assert [len(r.token_ids) for r in out.requests] == ([10, 6] if chunked else [10])
    assert [r.sample for r in out.requests] == ([True, False] if chunked else [True])
