"""serve/token_channel.py: a model server's outbox and a gateway's inbox over a real loopback socket
(pure asyncio, no Ray)."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from engine.outputs import RequestOutput, TokenLogprobs
from serve import token_channel
from serve.errors import ReplicaUnavailableError, TokenChannelError
from serve.model_protocol import ChannelAddress, ModelChunk, chunk_of
from serve.token_channel import TokenInbox, TokenOutbox, call_chunks


def output(key: str, i: int, count: int, logprobs: bool = False) -> RequestOutput:
    lp = (TokenLogprobs(100 + i, -0.5 * i, (100 + i, 7), (-0.5 * i, -3.0)),) if logprobs else None
    return RequestOutput(key, (100 + i,), lp, "length" if i == count - 1 else None, 5, i + 1, 2)


async def model_server_call(link, key: str, count: int, gap_s: float = 0.0, logprobs: bool = False):
    """What ModelServer.generate does with a link: every output but the last over the channel, the last in
    the call with the number of tokens sent before it."""
    sent = 0
    for i in range(count):
        await asyncio.sleep(gap_s)
        out = output(key, i, count, logprobs)
        if out.finish_reason is not None:
            yield dataclasses.replace(chunk_of(out), replica_id="ms-1", channel_tokens_before=sent)
            return
        link.send(key, out)
        sent += 1


async def connected(outbox: TokenOutbox, address: ChannelAddress):
    """The link once its background connection is up (None: the gateway turned out unreachable)."""
    assert outbox.link(address) is None  # the first ask starts the connection; the call carries meanwhile
    await outbox._links[(address.host, address.port)]  # noqa: SLF001 - wait for that connection
    return outbox.link(address)


async def pair():
    inbox = TokenInbox("127.0.0.1")
    address = await inbox.address()
    outbox = TokenOutbox("ms-1")
    link = await connected(outbox, address)
    assert link is not None
    return inbox, outbox, link


def test_many_streams_share_one_connection_and_each_gets_its_tokens_in_order_with_one_cancelled(monkeypatch):
    async def main():
        inbox, outbox, link = await pair()
        frames = []  # records per frame written
        write_records = token_channel._write_records
        monkeypatch.setattr(token_channel, "_write_records",
                            lambda writer, records: (frames.append(len(records)), write_records(writer, records)))

        async def stream(key: str, count: int, cancel_after: int | None = None):
            tokens, last = [], None
            # No gap between tokens: every stream samples in the same loop turn, as an engine step's
            # outputs wake their streams together (sleeps of their own drift apart on a loaded machine).
            chunks = call_chunks(model_server_call(link, key, count), inbox.open(key), 5.0)
            try:
                async for chunk in chunks:
                    tokens += chunk.token_ids
                    assert chunk.replica_id == "ms-1"
                    last = chunk
                    if cancel_after is not None and len(tokens) >= cancel_after:
                        break
            finally:
                await chunks.aclose()
                inbox.close(key)
            return tokens, last

        results = await asyncio.gather(*(stream(f"k{i}", 20, cancel_after=5 if i == 3 else None) for i in range(16)))
        for i, (tokens, last) in enumerate(results):
            if i == 3:
                assert tokens[:5] == list(range(100, 105)) and last.finish_reason is None
            else:
                assert tokens == list(range(100, 120)), i
                assert last.finish_reason == "length" and last.num_output_tokens == 20 and last.num_cached_tokens == 2
        # Streams that sampled in the same loop turn went out in one frame: far fewer frames than records.
        assert sum(frames) > 2 * len(frames)
        outbox.close()
        inbox.stop()

    asyncio.run(main())


def test_logprobs_and_counts_cross_the_channel_intact():
    async def main():
        inbox, outbox, link = await pair()
        queue = inbox.open("a")
        chunks = [c async for c in call_chunks(model_server_call(link, "a", 4, logprobs=True), queue, 5.0)]
        logprobs = [lp for c in chunks for lp in c.logprobs]
        assert logprobs == [output("a", i, 4, True).new_logprobs[0] for i in range(4)]
        assert [t for c in chunks for t in c.token_ids] == [100, 101, 102, 103]
        outbox.close()
        inbox.stop()

    asyncio.run(main())


def test_the_last_chunk_waits_for_the_tokens_sent_before_it_over_the_channel():
    async def main():
        queue: asyncio.Queue = asyncio.Queue()

        async def call():  # the last chunk overtakes two channel records
            yield ModelChunk((103,), None, "stop", 5, 4, 0, "ms-1", channel_tokens_before=3)

        async def channel():
            await asyncio.sleep(0.05)
            queue.put_nowait(ModelChunk((100, 101), None, None, 5, 2, 0, "ms-1"))
            await asyncio.sleep(0.05)
            queue.put_nowait(ModelChunk((102,), None, None, 5, 3, 0, "ms-1"))

        task = asyncio.create_task(channel())
        chunks = [c async for c in call_chunks(call(), queue, 5.0)]
        await task
        assert [t for c in chunks for t in c.token_ids] == [100, 101, 102, 103]
        assert chunks[-1].finish_reason == "stop"

        async def short_call():
            yield ModelChunk((103,), None, "stop", 5, 4, 0, "ms-1", channel_tokens_before=3)

        with pytest.raises(TokenChannelError, match="3 tokens over the token channel, 0 arrived"):
            [c async for c in call_chunks(short_call(), asyncio.Queue(), 0.1)]

    asyncio.run(main())


def test_an_error_of_the_call_is_raised_and_what_came_before_it_is_an_in_order_prefix():
    """Only a call's last chunk waits for its channel tokens; an error ends the stream at once (the
    gateway moves it on with exactly the tokens it passed on)."""
    async def main():
        inbox, outbox, link = await pair()

        async def failing_call():
            for i in range(3):
                link.send("a", output("a", i, 10))
                await asyncio.sleep(0.01)
            raise ReplicaUnavailableError("group failed", "ms-1")
            yield  # an async generator

        tokens = []
        with pytest.raises(ReplicaUnavailableError, match="group failed"):
            async for chunk in call_chunks(failing_call(), inbox.open("a"), 5.0):
                tokens += chunk.token_ids
        assert tokens == [100, 101, 102][:len(tokens)]
        outbox.close()
        inbox.stop()

    asyncio.run(main())


def test_a_connection_that_breaks_fails_its_open_streams_as_a_replica_failure():
    async def main():
        inbox, outbox, link = await pair()
        queue = inbox.open("a")
        link.send("a", output("a", 0, 10))
        assert (await asyncio.wait_for(queue.get(), 5)).token_ids == (100,)
        link.send("a", output("a", 1, 10))
        outbox.close()  # the model server replica went away, after sending what it had queued
        assert (await asyncio.wait_for(queue.get(), 5)).token_ids == (101,)
        error = await asyncio.wait_for(queue.get(), 5)
        assert isinstance(error, TokenChannelError) and "ms-1" in str(error)
        assert link.broken is not None
        with pytest.raises(TokenChannelError):
            link.send("a", output("a", 2, 10))
        inbox.stop()

    asyncio.run(main())


def test_a_connection_without_the_gateways_secret_is_refused_and_its_streams_go_in_their_calls():
    async def main():
        inbox = TokenInbox("127.0.0.1")
        address = await inbox.address()
        queue = inbox.open("a")
        stranger = TokenOutbox("intruder")
        assert await connected(stranger, ChannelAddress(address.host, address.port, b"0" * 16)) is None
        assert stranger.link(address) is None  # not tried again for a while: no stall per request
        await asyncio.sleep(0.1)
        assert queue.empty()
        inbox.stop()

    asyncio.run(main())


def test_a_malformed_frame_closes_the_connection_and_fails_its_open_streams():
    async def main():
        inbox, outbox, link = await pair()
        queue = inbox.open("a")
        link.send("a", output("a", 0, 10))
        assert (await asyncio.wait_for(queue.get(), 5)).token_ids == (100,)
        link._writer.write((5).to_bytes(4, "big") + b"\xc1\xc1\xc1\xc1\xc1")  # noqa: SLF001 - not msgpack
        assert isinstance(await asyncio.wait_for(queue.get(), 5), TokenChannelError)
        await asyncio.sleep(0.1)
        assert link.broken is not None  # the gateway hung up: the next stream reconnects
        outbox.close()
        inbox.stop()

    asyncio.run(main())


def test_records_for_a_closed_key_are_dropped_and_others_still_arrive():
    async def main():
        inbox, outbox, link = await pair()
        kept, dropped = inbox.open("kept"), inbox.open("dropped")
        inbox.close("dropped")
        link.send("dropped", output("dropped", 0, 10))
        link.send("kept", output("kept", 0, 10))
        assert (await asyncio.wait_for(kept.get(), 5)).token_ids == (100,)
        assert dropped.empty()
        outbox.close()
        inbox.stop()

    asyncio.run(main())


def test_a_backlog_goes_out_in_frames_of_bounded_size():
    class Writer:
        def __init__(self):
            self.frames = []

        def write(self, data: bytes):
            self.frames.append(data)

    records = [bytes(300 << 10) for _ in range(10)] + [bytes(3 << 20)]  # 3 MiB alone, over the target
    writer = Writer()
    token_channel._write_records(writer, records)
    sizes = [int.from_bytes(f[:4], "big") for f in writer.frames]
    assert all(size == len(f) - 4 for size, f in zip(sizes, writer.frames, strict=True))
    assert max(sizes[:-1]) <= token_channel._FRAME_TARGET_BYTES and sizes[-1] > 3 << 20
    assert len(writer.frames) == 5  # 3 + 3 + 3 + 1 records of 300 KiB, then the big one alone


def test_an_unreachable_gateway_gives_no_link_so_the_call_carries_the_tokens():
    async def main():
        inbox = TokenInbox("127.0.0.1")
        address = await inbox.address()
        inbox.stop()
        await asyncio.sleep(0.05)
        assert await connected(TokenOutbox("ms-1"), address) is None

    asyncio.run(main())


def test_a_gateway_that_cannot_listen_once_listens_on_the_next_try(monkeypatch):
    real_start = asyncio.start_server
    tries = []

    async def start_server(*args, **kwargs):
        tries.append(1)
        if len(tries) == 1:
            raise OSError("address not available")
        return await real_start(*args, **kwargs)

    monkeypatch.setattr(asyncio, "start_server", start_server)

    async def main():
        inbox = TokenInbox("127.0.0.1")
        with pytest.raises(OSError, match="address not available"):
            await inbox.address()
        address = await inbox.address()
        assert address.port > 0 and await inbox.address() == address and len(tries) == 2
        inbox.stop()

    asyncio.run(main())


def test_outputs_of_one_stream_sent_in_one_loop_turn_arrive_as_one_record_with_the_last_counts():
    async def main():
        inbox, outbox, link = await pair()
        queue = inbox.open("a")
        for i in range(3):  # one loop turn: one record
            link.send("a", output("a", i, 10, logprobs=True))
        chunk = await asyncio.wait_for(queue.get(), 5.0)
        assert chunk.token_ids == (100, 101, 102)
        assert chunk.logprobs == tuple(output("a", i, 10, True).new_logprobs[0] for i in range(3))
        assert (chunk.num_prompt_tokens, chunk.num_output_tokens, chunk.num_cached_tokens) == (5, 3, 2)
        assert chunk.finish_reason is None and chunk.replica_id == "ms-1"
        assert queue.empty()
        outbox.close()
        inbox.stop()

    asyncio.run(main())

