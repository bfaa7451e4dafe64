"""Merging a stream's tokens into fewer, fuller chunks where each chunk costs a Ray message."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from serve.model_protocol import ModelChunk, merge_chunks


@dataclass(frozen=True)
class MergePolicy:
    """How a stream's tokens are merged into chunks where chunks become messages: in the gateway (to the
    client, or the proxy) when the token channel brings the tokens (serve.token_channel.call_chunks),
    else in the model server (model server -> gateway; merge_stream). A message costs about the same
    CPU whatever it carries, so under load a chunk waits for a few tokens; the first token of a stream
    always goes at once.

    Attributes:
        min_interval_s: every chunk after the first waits at least this long after the previous one.
        streams_per_token: each this many streams open in the replica that merges add one token to what
            a chunk waits for (16: 1 token up to 15 streams, 9 at 128); 0: a chunk carries what is ready.
        max_wait_s: the most a token waits for its chunk to fill (the added inter-token latency). A stream
            whose tokens come further apart than this does not wait: it would only add the latency (and a
            wake-up per token) and merge nothing, as with many streams on a slow engine.
    """

    min_interval_s: float = 0.0
    streams_per_token: int = 0
    max_wait_s: float = 0.0

    @classmethod
    def of(cls, model_server) -> MergePolicy:
        """The policy `model_server.stream_*` (serve.config.ModelServerSection) ask for."""
        return cls(model_server.stream_interval_ms / 1000, model_server.stream_merge_streams_per_token,
                   model_server.stream_merge_max_wait_ms / 1000)

    def target_tokens(self, num_open_streams: int) -> int:
        if self.streams_per_token <= 0 or self.max_wait_s <= 0:
            return 1
        return 1 + num_open_streams // self.streams_per_token

    def due(self, sent_at: float, num_tokens: int, held_since: float, num_open_streams: int, now: float,
            finishes: bool = False, gap_s: float = 0.0) -> float:
        """When `num_tokens` tokens, held since `held_since`, may go as one chunk: at once for a stream's
        first chunk (`sent_at` 0) or its finish, else not before `min_interval_s` after the previous
        chunk and, below the target, not before they have waited `max_wait_s`, unless the stream's latest
        gap between two arrivals (`gap_s`) was longer than that."""
        if not sent_at or finishes:
            return now
        filled = (now if num_tokens >= self.target_tokens(num_open_streams) or gap_s > self.max_wait_s
                  else held_since + self.max_wait_s)
        return max(sent_at + self.min_interval_s, filled)


class Arrivals:
    """When a stream's chunks reach a merger: `gap_s`, the latest gap between two (MergePolicy.due's
    `gap_s`; 0 until two have come)."""

    def __init__(self) -> None:
        self._last_at = 0.0
        self.gap_s = 0.0

    def arrived(self, now: float) -> None:
        if self._last_at:
            self.gap_s = now - self._last_at
        self._last_at = now


async def merge_stream(chunks: AsyncIterator[ModelChunk], policy: MergePolicy,
                        num_open_streams: Callable[[], int] = lambda: 1) -> AsyncIterator[ModelChunk]:
    """The stream's chunks, merging the ones that are ready together (when the caller reads slower than
    they come, a chunk carries several steps' tokens) and, after the first chunk, holding one back as
    `policy` says for the number of streams open now. Leaving early closes `chunks`."""
    buffered: list = []  # ModelChunks, then the end marker or the error
    end = object()
    state = {"tokens": 0, "want": 1, "first_at": 0.0}
    arrivals = Arrivals()
    ready = asyncio.Event()  # set when the buffer holds what the merger waits for

    async def read() -> None:
        try:
            async for chunk in chunks:
                now = time.monotonic()
                if not buffered:
                    state["first_at"] = now
                arrivals.arrived(now)
                buffered.append(chunk)
                state["tokens"] += len(chunk.token_ids)
                if state["want"] <= 1 or state["tokens"] >= state["want"] or chunk.finish_reason is not None:
                    ready.set()
            buffered.append(end)
        except Exception as e:  # noqa: BLE001 - handed to the merger, which raises it
            buffered.append(e)
        ready.set()

    def ended() -> bool:
        return bool(buffered) and (buffered[-1] is end or isinstance(buffered[-1], Exception))

    reader = asyncio.create_task(read())
    last_sent = 0.0
    try:
        while True:
            state["want"] = 1
            while not buffered:
                ready.clear()
                await ready.wait()
            while not ended():
                now = time.monotonic()
                last = buffered[-1]
                due = policy.due(last_sent, state["tokens"], state["first_at"], num_open_streams(), now,
                                 finishes=isinstance(last, ModelChunk) and last.finish_reason is not None,
                                 gap_s=arrivals.gap_s)
                if due <= now:
                    break
                state["want"] = policy.target_tokens(num_open_streams())  # the reader wakes us when filled
                ready.clear()
                # A timer that sets the event: asyncio.wait_for would wrap the wait in a task and cancel it
                # on every chunk that does not fill, which under load is most of them.
                timer = asyncio.get_running_loop().call_later(due - now, ready.set)
                try:
                    await ready.wait()
                finally:
                    timer.cancel()
            items = buffered[:]
            buffered.clear()
            state["tokens"] = 0
            finished = [item for item in items if item is end or isinstance(item, Exception)]
            merged = [item for item in items if isinstance(item, ModelChunk)]
            if merged:
                yield merge_chunks(merged)
                last_sent = time.monotonic()
            if finished:
                if isinstance(finished[0], Exception):
                    raise finished[0]
                return
    finally:
        reader.cancel()  # the caller left: what the chunks come from (a group's generator) is closed
        await asyncio.gather(reader, return_exceptions=True)
