"""The token channel: how a model server replica hands a gateway replica the tokens it samples.

A Serve streaming item costs about the same CPU in both processes whatever it carries, so one item per
chunk per stream spends a GPU node's cores on Ray. Instead each model server replica keeps one TCP
connection to each gateway replica that sends it requests and writes on it, per engine step, ONE frame
carrying the new tokens of every stream it serves for that gateway; the gateway hands each record to its
choice by key.

The per-choice Serve call keeps everything else of the request's lifecycle: routing, the ongoing-request
counts autoscaling reads, cancel (the gateway cancels the call, the model server aborts the request),
errors (raised through the call), drain and migration. It also carries each stream's LAST chunk (the
finish reason and usage) with the number of tokens sent over the channel before it, so the gateway
knows when it has them all. A model server that cannot reach a gateway's channel sends every chunk in
the call, as it did before the channel.

Wire: a frame is a 4-byte big-endian length and a msgpack array (never pickle: the port is open to the
node's network). A connection opens with a hello `[version, secret, replica_id]`, the secret being the
gateway replica's (random, handed to the model server inside the Serve request), so only model servers
of this application are read. Then frames of records `[key, token_ids, logprobs, num_prompt_tokens,
num_output_tokens, num_cached_tokens]`, logprobs `None` or one `[token_id, logprob, top_ids,
top_logprobs]` per token.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import math
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import msgpack
from ray.serve.exceptions import RequestCancelledError

from engine.outputs import RequestOutput, TokenLogprobs
from serve.errors import TokenChannelError
from serve.model_protocol import ChannelAddress, ModelChunk, chunk_of, merge_chunks
from serve.stream_merge import Arrivals, MergePolicy

logger = logging.getLogger("ray.serve")

_VERSION = 1
_HELLO_MAX_BYTES = 4096
_FRAME_MAX_BYTES = 64 << 20  # what the gateway reads
_FRAME_TARGET_BYTES = 1 << 20  # what the model server writes (a longer record alone in its frame)
_ACK = b"\x06"  # the gateway's answer to a hello it accepts
_CONNECT_TIMEOUT_S = 5.0
_RETRY_UNREACHABLE_S = 60.0  # a gateway found unreachable is not tried again for this long
# Past this many unsent bytes a link stops writing until the socket drains; meanwhile each stream's
# tokens merge into one record (a slow gateway gets fewer, fuller frames, not an unbounded buffer).
_WRITE_HIGH_WATER_BYTES = 1 << 20


# --- the gateway's end ---------------------------------------------------------------------------


class TokenInbox:
    """One gateway replica's listening socket, and a queue per open model server call (by key)."""

    def __init__(self, host: str):
        self._host = host
        self._secret = secrets.token_bytes(16)
        self._server: asyncio.Server | None = None
        self._starting: asyncio.Future | None = None
        self._address: ChannelAddress | None = None
        self._queues: dict[str, asyncio.Queue] = {}
        self._sources: dict[str, object] = {}  # key -> the connection its records came on
        self._connections: set[asyncio.StreamWriter] = set()

    async def address(self) -> ChannelAddress:
        """Starts listening on first use (an ephemeral port on `host`). Raises OSError when it cannot;
        the next call tries again."""
        if self._address is None:
            if self._starting is None:
                self._starting = asyncio.ensure_future(asyncio.start_server(self._serve, self._host, 0))
            try:
                self._server = await asyncio.shield(self._starting)
            except OSError:
                self._starting = None
                raise
            self._address = ChannelAddress(self._host, self._server.sockets[0].getsockname()[1], self._secret)
        return self._address

    def open(self, key: str) -> asyncio.Queue:
        """The queue the records of `key` go to (ModelChunks; a TokenChannelError when their
        connection breaks) until `close(key)`."""
        queue = self._queues[key] = asyncio.Queue()
        return queue

    def close(self, key: str) -> None:
        """Records for `key` that arrive later are dropped."""
        self._queues.pop(key, None)
        self._sources.pop(key, None)

    def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in self._connections:
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connection = object()
        replica_id = ""
        self._connections.add(writer)
        try:
            hello = await asyncio.wait_for(_read_frame(reader, _HELLO_MAX_BYTES), _CONNECT_TIMEOUT_S)
            if not (isinstance(hello, list) and len(hello) == 3 and hello[0] == _VERSION
                    and isinstance(hello[1], bytes) and hmac.compare_digest(hello[1], self._secret)):
                logger.warning("token channel: closed a connection from %s that did not open with this "
                               "gateway's hello", writer.get_extra_info("peername"))
                return
            replica_id = str(hello[2])
            writer.write(_ACK)  # the model server sends nothing over a connection it was not let in on
            while (records := await _read_frame(reader, _FRAME_MAX_BYTES)) is not None:
                for record in records:
                    queue = self._queues.get(record[0])
                    if queue is not None:
                        self._sources[record[0]] = connection
                        queue.put_nowait(_chunk_from_record(record, replica_id))
        except Exception as e:  # noqa: BLE001 - a broken or malformed connection: its streams move on
            logger.warning("token channel from model server replica %s broke: %s: %s", replica_id or "?",
                           type(e).__name__, e)
        finally:
            self._connections.discard(writer)
            writer.close()
            lost = [key for key, source in self._sources.items() if source is connection]
            for key in lost:
                self._sources.pop(key)
                self._queues[key].put_nowait(TokenChannelError(
                    f"the token channel from model server replica {replica_id} closed mid-stream"))


# --- the model server's end ----------------------------------------------------------------------


class TokenOutbox:
    """One model server replica's links, one per gateway replica it has served (made on first use)."""

    def __init__(self, replica_id: str):
        self.replica_id = replica_id
        self._links: dict[tuple[str, int], asyncio.Future] = {}
        self._unreachable_until: dict[tuple[str, int], float] = {}

    def link(self, address: ChannelAddress) -> _Link | None:
        """The link to `address` when it is up; else None (the caller sends in the call) and, unless the
        gateway was found unreachable within the last minute, a connection starts in the background."""
        where = (address.host, address.port)
        future = self._links.get(where)
        if future is not None and future.done():
            link = future.result()
            if link is not None and not link.broken:
                return link
            if link is None and time.monotonic() < self._unreachable_until.get(where, 0.0):
                return None
            future = None  # try again
        if future is None:
            self._links[where] = asyncio.ensure_future(self._connect(address))
        return None

    async def _connect(self, address: ChannelAddress) -> _Link | None:
        where = (address.host, address.port)
        writer = None
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(*where), _CONNECT_TIMEOUT_S)
            _write_frame(writer, [_VERSION, address.secret, self.replica_id])
            if await asyncio.wait_for(reader.readexactly(len(_ACK)), _CONNECT_TIMEOUT_S) != _ACK:
                raise ConnectionRefusedError("the gateway did not acknowledge the hello")
        except (OSError, EOFError, TimeoutError) as e:
            if writer is not None:
                writer.close()
            logger.warning("token channel: gateway at %s:%d unreachable (%s: %s); its streams go in their "
                           "Serve calls for the next %g s", *where, type(e).__name__, e, _RETRY_UNREACHABLE_S)
            self._unreachable_until[where] = time.monotonic() + _RETRY_UNREACHABLE_S
            return None
        for other, future in list(self._links.items()):  # gateway replicas gone since
            if future.done() and future.result() is not None and future.result().broken:
                del self._links[other]
        return _Link(reader, writer)

    def close(self) -> None:
        for future in self._links.values():
            if future.done() and future.result() is not None:
                future.result().close()


class _Link:
    """One connection to a gateway: what streams send within one event-loop turn (one engine step's
    outputs wake their streams together) goes out as one frame."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self._writer = writer
        self._pending: dict[str, list[RequestOutput]] = {}
        self._flush_scheduled = False
        self._draining = False
        self.broken: Exception | None = None
        self._watch = asyncio.ensure_future(self._watch_closed(reader))  # the gateway never writes: EOF = gone

    def send(self, key: str, output: RequestOutput) -> None:
        """Queues `output`'s tokens for the gateway's `key`. Raises TokenChannelError once the link broke."""
        if self.broken is not None:
            raise TokenChannelError(f"the token channel to the gateway broke: {self.broken}")
        self._pending.setdefault(key, []).append(output)
        if not self._flush_scheduled and not self._draining:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if not self._pending or self.broken is not None:
            return
        pending, self._pending = self._pending, {}
        try:
            records = [msgpack.packb(_record(key, merge_chunks([chunk_of(o) for o in outputs])), use_bin_type=True)
                       for key, outputs in pending.items()]
            _write_records(self._writer, records)
        except Exception as e:  # noqa: BLE001 - a closed transport: the streams learn it at their next send
            self._break(e)
            return
        if self._writer.transport.get_write_buffer_size() > _WRITE_HIGH_WATER_BYTES:
            self._draining = True
            asyncio.ensure_future(self._drain())

    async def _drain(self) -> None:
        try:
            await self._writer.drain()
        except Exception as e:  # noqa: BLE001
            self._break(e)
            return
        finally:
            self._draining = False
        self._flush()

    async def _watch_closed(self, reader: asyncio.StreamReader) -> None:
        try:
            await reader.read()
        except Exception:  # noqa: BLE001, S110 - a reset: broken as a close is
            pass
        finally:
            self._break(ConnectionResetError("the gateway closed the token channel"))

    def _break(self, error: Exception) -> None:
        self.broken = self.broken or error
        self._writer.close()

    def close(self) -> None:
        """Sends what is queued, then closes."""
        self._flush()
        self._watch.cancel()
        self._break(ConnectionResetError("closed by the model server"))


# --- the gateway's view of one call --------------------------------------------------------------


_CALL_ENDED = object()
_AS_READY = MergePolicy()  # each chunk as soon as nothing more is ready


@dataclass(frozen=True)
class _InCall:
    chunk: ModelChunk


class _Wake:
    """Put in a call's queue by a timer: the wait it was set for is over (a later one ignores it)."""


async def call_chunks(call: AsyncIterator[ModelChunk], queue: asyncio.Queue, last_tokens_wait_s: float,
                      merge: MergePolicy = _AS_READY, num_open_streams: Callable[[], int] = lambda: 1
                      ) -> AsyncIterator[ModelChunk]:
    """One model server call's chunks in order, whichever way each came: over the channel (into `queue`)
    or in the call. The call's errors are raised (after the tokens that came before them); a last chunk
    whose channel tokens do not all arrive within `last_tokens_wait_s` raises TokenChannelError (the
    stream moves on elsewhere).

    Chunks are merged as `merge` says for the streams open now (serve/stream_merge.py's rules: the first
    at once, then what is ready, a chunk waiting for more tokens at most `merge.max_wait_s`). Merging
    reads the queue itself, with timers that put a wake-up in it: merge_stream's reader task and event
    would cost one more task step per chunk."""

    async def follow_call() -> None:
        try:
            async for chunk in call:
                queue.put_nowait(_InCall(chunk))
            queue.put_nowait(_CALL_ENDED)
        except asyncio.CancelledError:
            if asyncio.current_task().cancelling():
                raise  # closed by the reader below
            queue.put_nowait(RequestCancelledError())  # the call itself was cancelled (an abort, a move)
        except Exception as e:  # noqa: BLE001 - raised by the reader below
            queue.put_nowait(e)

    loop = asyncio.get_running_loop()
    follower = asyncio.create_task(follow_call())
    received = 0  # tokens that came over the channel
    last: ModelChunk | None = None  # the call's last chunk, held until the channel's tokens are all in
    last_since = 0.0  # when it came
    ended = False  # the call has ended (its last chunk may still be held)
    pending: list[ModelChunk] = []  # ready to go, in order, waiting to be merged
    pending_tokens = 0
    pending_since = 0.0  # when the first of them came
    arrivals = Arrivals()
    sent_at = 0.0  # when the previous chunk went (0: none yet)
    error: BaseException | None = None
    wake: _Wake | None = None
    try:
        while True:
            item = queue.get_nowait() if not queue.empty() else None
            if item is None:
                # Nothing ready: send what is pending if it may go now, else wait for more or a deadline.
                now = time.monotonic()
                due = None  # when pending may go without more tokens
                if pending:
                    due = merge.due(sent_at, pending_tokens, pending_since, num_open_streams(), now,
                                    finishes=pending[-1].finish_reason is not None, gap_s=arrivals.gap_s)
                    if due <= now:
                        chunk = merge_chunks(pending)
                        pending, pending_tokens = [], 0
                        yield chunk
                        sent_at = time.monotonic()
                        continue
                deadline = due
                if last is not None:
                    deadline = min(deadline or math.inf, last_since + last_tokens_wait_s)
                wake = None
                timer = None
                if deadline is not None:
                    wake = _Wake()
                    timer = loop.call_at(loop.time() + max(0.0, deadline - now), queue.put_nowait, wake)
                try:
                    item = await queue.get()
                finally:
                    if timer is not None:
                        timer.cancel()
            if isinstance(item, _Wake):
                if item is wake and last is not None and time.monotonic() >= last_since + last_tokens_wait_s:
                    raise TokenChannelError(
                        f"model server replica {last.replica_id} sent {last.channel_tokens_before} tokens over the "
                        f"token channel, {received} arrived within {last_tokens_wait_s:g} s")
                continue  # a merge deadline (the loop sends), or a timer already done with
            if isinstance(item, BaseException):
                error = item
                break
            if item is _CALL_ENDED:
                if last is None:
                    break
                ended = True
                continue
            if isinstance(item, _InCall):
                if item.chunk.channel_tokens_before > received:
                    last, last_since = item.chunk, time.monotonic()
                    continue
                chunk = item.chunk
            else:
                chunk = item
                received += len(chunk.token_ids)
            now = time.monotonic()
            if not pending:
                pending_since = now
            arrivals.arrived(now)
            pending.append(chunk)
            pending_tokens += len(chunk.token_ids)
            if last is not None and received >= last.channel_tokens_before:
                pending.append(last)
                last = None
                if ended:
                    break
        if pending:
            yield merge_chunks(pending)
        if error is not None:
            raise error
    finally:
        follower.cancel()
        await asyncio.gather(follower, return_exceptions=True)


# --- wire ------------------------------------------------------------------------------------------


async def _read_frame(reader: asyncio.StreamReader, max_bytes: int):
    """The next frame's array, None at a clean end of stream."""
    try:
        header = await reader.readexactly(4)
    except asyncio.IncompleteReadError as e:
        if e.partial:
            raise
        return None
    size = int.from_bytes(header, "big")
    if size > max_bytes:
        raise ValueError(f"a frame of {size} bytes, more than {max_bytes}")
    return msgpack.unpackb(await reader.readexactly(size), raw=False, use_list=True)


def _write_frame(writer: asyncio.StreamWriter, frame: list) -> None:
    body = msgpack.packb(frame, use_bin_type=True)
    writer.write(len(body).to_bytes(4, "big") + body)


def _write_records(writer: asyncio.StreamWriter, records: list[bytes]) -> None:
    """Packed records as frames of at most _FRAME_TARGET_BYTES (one record may exceed it alone)."""
    start = 0
    while start < len(records):
        end, size = start, 0
        while end < len(records) and (end == start or size + len(records[end]) <= _FRAME_TARGET_BYTES):
            size += len(records[end])
            end += 1
        header = msgpack.Packer().pack_array_header(end - start)
        writer.write((len(header) + size).to_bytes(4, "big") + header + b"".join(records[start:end]))
        start = end


def _record(key: str, chunk: ModelChunk) -> list:
    logprobs = None if chunk.logprobs is None else [
        [lp.token_id, lp.logprob, list(lp.top_token_ids), list(lp.top_logprobs)] for lp in chunk.logprobs]
    return [key, list(chunk.token_ids), logprobs, chunk.num_prompt_tokens, chunk.num_output_tokens,
            chunk.num_cached_tokens]


def _chunk_from_record(record: list, replica_id: str) -> ModelChunk:
    _, token_ids, logprobs, num_prompt, num_output, num_cached = record
    if logprobs is not None:
        logprobs = tuple(TokenLogprobs(int(t), float(lp), tuple(map(int, ids)), tuple(map(float, lps)))
                         for t, lp, ids, lps in logprobs)
    return ModelChunk(tuple(map(int, token_ids)), logprobs, None, int(num_prompt), int(num_output), int(num_cached),
                      replica_id)
