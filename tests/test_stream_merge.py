"""How a stream's tokens are merged into chunks (pure asyncio): by serve/stream_merge.py where chunks come in
the Serve call, and by serve/token_channel.call_chunks where they come over the token channel; both follow
one MergePolicy, so every rule is checked on both."""

from __future__ import annotations

import asyncio
import dataclasses
import time

import pytest

from engine.outputs import RequestOutput
from serve.model_protocol import chunk_of
from serve.stream_merge import MergePolicy, merge_stream
from serve.token_channel import call_chunks


async def outputs_every(gap_s: float, count: int, *, fail_after: int | None = None, seen: list | None = None):
    """An engine stream: one token every `gap_s`, the last with finish_reason "length"."""
    try:
        for i in range(count):
            await asyncio.sleep(gap_s)
            if fail_after is not None and i == fail_after:
                raise RuntimeError("group failed")
            yield chunk_of(RequestOutput("r", (100 + i,), None, "length" if i == count - 1 else None, 5, i + 1, 0))
    finally:
        if seen is not None:
            seen.append("closed")


def over_channel(chunks, policy: MergePolicy, open_streams):
    """call_chunks merging `chunks` as the gateway gets them over the token channel: all but the last in its
    queue, the last in the Serve call with the number of tokens sent before it."""
    queue: asyncio.Queue = asyncio.Queue()

    async def call():  # ends when `chunks` does, however long after its last chunk that is
        sent = 0
        async for chunk in chunks:
            if chunk.finish_reason is not None:
                yield dataclasses.replace(chunk, channel_tokens_before=sent)
            else:
                queue.put_nowait(chunk)
                sent += len(chunk.token_ids)

    return call_chunks(call(), queue, 5.0, policy, open_streams)


MERGERS = {"in_the_call": merge_stream, "over_the_channel": over_channel}


@pytest.fixture(params=sorted(MERGERS))
def merger(request):
    return MERGERS[request.param]


async def collect(policy: MergePolicy, gap_s: float, count: int, open_streams: int, merger=merge_stream):
    chunks, times = [], []
    started = time.monotonic()
    async for chunk in merger(outputs_every(gap_s, count), policy, lambda: open_streams):
        chunks.append(chunk)
        times.append(time.monotonic() - started)
    return chunks, times


def test_the_policy_asks_one_more_token_per_streams_per_token_open_streams():
    policy = MergePolicy(streams_per_token=16, max_wait_s=0.05)
    assert [policy.target_tokens(n) for n in (1, 15, 16, 32, 128)] == [1, 1, 2, 3, 9]
    assert MergePolicy(streams_per_token=0, max_wait_s=0.05).target_tokens(128) == 1
    assert MergePolicy(streams_per_token=16, max_wait_s=0).target_tokens(128) == 1


def test_a_chunk_is_due_at_once_first_then_at_its_target_or_after_max_wait_and_never_within_the_interval():
    policy = MergePolicy(min_interval_s=0.02, streams_per_token=16, max_wait_s=0.05)  # 128 streams: 9 tokens
    assert policy.due(0.0, 1, 10.0, 128, now=10.0) == 10.0  # a stream's first chunk
    assert policy.due(9.0, 9, 10.0, 128, now=10.01) == 10.01  # filled
    assert policy.due(9.0, 3, 10.0, 128, now=10.01) == 10.05  # waits for more, at most max_wait
    assert policy.due(10.0, 9, 10.0, 128, now=10.01) == 10.02  # filled, but within the interval
    assert policy.due(9.0, 1, 10.0, 128, now=10.0, gap_s=0.08) == 10.0  # tokens come further apart than max_wait
    assert policy.due(9.0, 1, 10.0, 128, now=10.0, gap_s=0.03) == 10.05


def test_under_load_chunks_carry_the_target_and_the_first_token_goes_at_once(merger):
    policy = MergePolicy(streams_per_token=16, max_wait_s=0.5)
    chunks, times = asyncio.run(collect(policy, 0.01, 13, open_streams=64, merger=merger))  # target 5
    assert [t for c in chunks for t in c.token_ids] == list(range(100, 113))  # all, in order
    assert len(chunks[0].token_ids) == 1 and times[0] < 0.1
    assert [len(c.token_ids) for c in chunks[1:]] == [5, 5, 2]  # the last one ends at the finish
    assert chunks[-1].finish_reason == "length" and chunks[-1].num_output_tokens == 13


def test_a_token_waits_at_most_max_wait_for_its_chunk(merger):
    policy = MergePolicy(streams_per_token=1, max_wait_s=0.05)  # asks 33 tokens: never reached
    chunks, times = asyncio.run(collect(policy, 0.03, 8, open_streams=32, merger=merger))
    assert [t for c in chunks for t in c.token_ids] == list(range(100, 108))
    assert all(len(c.token_ids) <= 3 for c in chunks) and len(chunks) >= 4
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert max(gaps) < 0.05 + 0.03 + 0.05  # max_wait after its first token, plus that token's own gap, plus slack


def test_a_stream_whose_tokens_come_further_apart_than_max_wait_gets_them_without_the_wait(merger):
    yielded_at = []

    async def slow():  # a token every 0.15 s: waiting 0.1 s for a second one would merge nothing
        for i in range(6):
            await asyncio.sleep(0.15)
            yielded_at.append(time.monotonic())
            yield chunk_of(RequestOutput("r", (100 + i,), None, "length" if i == 5 else None, 5, i + 1, 0))

    async def run():
        delays = []
        async for chunk in merger(slow(), MergePolicy(streams_per_token=1, max_wait_s=0.1), lambda: 64):
            delays += [time.monotonic() - yielded_at[t - 100] for t in chunk.token_ids]
        return delays

    delays = asyncio.run(run())
    assert len(delays) == 6
    # From the second on (the first gap is seen as it comes), each goes as it comes, not max_wait later.
    assert max(delays) < 0.05, delays


def test_with_few_streams_or_merging_off_every_token_goes_as_sampled(merger):
    for policy, streams in ((MergePolicy(streams_per_token=16, max_wait_s=0.5), 4), (MergePolicy(), 128)):
        chunks, _ = asyncio.run(collect(policy, 0.01, 6, open_streams=streams, merger=merger))
        assert [len(c.token_ids) for c in chunks] == [1] * 6


def test_an_error_after_tokens_reaches_the_caller_after_the_tokens_before_it(merger):
    async def run():
        got = []
        with pytest.raises(RuntimeError, match="group failed"):
            async for chunk in merger(outputs_every(0.005, 10, fail_after=4),
                                      MergePolicy(streams_per_token=1, max_wait_s=0.5), lambda: 8):
                got.extend(chunk.token_ids)
        return got

    assert asyncio.run(run()) == [100, 101, 102, 103]


def test_leaving_early_closes_the_engine_stream_while_a_chunk_is_held(merger):
    async def run():
        seen = []
        merged = merger(outputs_every(0.01, 1000, seen=seen), MergePolicy(streams_per_token=1, max_wait_s=5),
                        lambda: 100)
        first = await merged.__anext__()
        waiting = asyncio.ensure_future(merged.__anext__())  # holds for 101 tokens or 5 s
        await asyncio.sleep(0.05)
        waiting.cancel()
        await asyncio.gather(waiting, return_exceptions=True)
        await merged.aclose()
        return first, seen

    first, seen = asyncio.run(run())
    assert first.token_ids == (100,) and seen == ["closed"]


def test_under_load_a_finished_stream_gets_its_last_tokens_at_once_not_at_the_merge_deadline(merger):
    async def source():  # its end comes well after its last chunk
        for i in range(3):
            yield chunk_of(RequestOutput("r", (100 + i,), None, None, 5, i + 1, 0))
            await asyncio.sleep(0.01)
        yield chunk_of(RequestOutput("r", (103,), None, "stop", 5, 4, 0))
        await asyncio.sleep(5.0)

    async def run():
        chunks = []
        started = time.monotonic()
        merged = merger(source(), MergePolicy(streams_per_token=1, max_wait_s=5.0), lambda: 64)  # 65 tokens, 5 s
        async for chunk in merged:
            chunks.append(chunk)
            if chunk.finish_reason is not None:
                break
        await merged.aclose()
        return chunks, time.monotonic() - started

    chunks, took_s = asyncio.run(run())
    assert took_s < 1.0
    assert [c.token_ids for c in chunks] == [(100,), (101, 102, 103)] and chunks[-1].finish_reason == "stop"
