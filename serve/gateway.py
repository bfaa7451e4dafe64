"""The request pipeline both APIs share (OpenAI HTTP and gRPC): check the model and the lengths, send
token ids to a model server replica through its DeploymentHandle, and turn the streamed token ids back
into text, reasoning and tool-call deltas (harmony's streaming parser), with stop strings applied here
(the engine sees ids only).

The API layers (openai_api.py, grpc_api.py) validate their own request shapes, render harmony into a
`Generation`, and map the `ChoiceEvent`s this yields (and `serve.errors` the exceptions) to their wire
formats.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import ray
from ray.serve.exceptions import DeploymentUnavailableError, RequestCancelledError

from engine.outputs import TokenLogprobs
from engine.routing import prefix_routing_keys
from engine.sampling_params import SamplingParams
from gptoss.errors import AuthenticationError, InvalidRequestError, NotFoundError, UnavailableError
from gptoss.harmony import (
    ChatMessage,
    FunctionTool,
    StreamDelta,
    StreamingParser,
    TextDelta,
    ToolCallArgsDelta,
    merge_deltas,
    render_prompt,
    tool_call_prefill,
)
from gptoss.tokenizer import CALL_ID, IncrementalDecoder
from serve.auth import ApiKeys
from serve.config import AppConfig
from serve.errors import ContextLengthError, ReplicaUnavailableError, unwrap
from serve.metrics import GatewayMetrics
from serve.protocol import ModelChunk, ModelInfo, ModelRequest

logger = logging.getLogger("ray.serve")

_HEALTH_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class Generation:
    """One request as the pipeline runs it, built by an API layer."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    sampling: SamplingParams
    n: int = 1  # independent choices; choice i > 0 uses seed + i when a seed is given
    stop: tuple[str, ...] = ()  # stop strings, on the answer's text
    harmony: bool = True  # parse the completion as harmony (chat), else plain text (completions)
    prefill_token_ids: tuple[int, ...] = ()  # the start of the reply, already at the prompt's end
    include_reasoning: bool = True
    cache_salt: str = ""  # the caller's tenant (from its API key): its own prefix-cache namespace


@dataclass(frozen=True)
class ChoiceUsage:
    num_prompt_tokens: int
    num_output_tokens: int
    num_cached_tokens: int
    num_reasoning_tokens: int


@dataclass(frozen=True)
class ChoiceEvent:
    """What one choice added since its previous event; the last one has `finish_reason`."""

    index: int
    token_ids: tuple[int, ...]
    deltas: tuple[StreamDelta, ...]  # text by channel ("final" for plain text), tool-call starts and args
    logprobs: tuple[TokenLogprobs, ...]  # of the tokens whose text is in the answer (or all, for plain text)
    finish_reason: str | None = None  # "stop", "length", "tool_calls", "abort" (cancelled by Abort)
    usage: ChoiceUsage | None = None  # the choice's counts so far (final on the last event)
    replica_id: str = ""  # the model server replica (EP group) serving the choice


class StopStrings:
    """Cuts a text stream at the first stop string. Text that could be the start of a stop string is
    held back until the next piece decides it, so no client ever sees part of a stop string."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = tuple(s for s in stops if s)
        self._held = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """(text to emit, whether a stop string ended the stream)."""
        text = self._held + text
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self._held = ""
            return text[: min(hits)], True
        keep = max((n for s in self.stops for n in range(min(len(s) - 1, len(text)), 0, -1)
                    if text.endswith(s[:n])), default=0)
        self._held = text[len(text) - keep:] if keep else ""
        return text[: len(text) - keep], False

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held


class ChoiceAssembler:
    """Turns one choice's model chunks into events: harmony parsing (or plain decoding), stop strings,
    the reasoning switch, logprobs of the answer's tokens, and the finish reason."""

    def __init__(self, index: int, generation: Generation):
        self.index = index
        self.generation = generation
        self.parser = StreamingParser() if generation.harmony else None
        self.decoder = None if generation.harmony else IncrementalDecoder()
        self.stop = StopStrings(generation.stop) if generation.stop else None
        self.stopped = False  # by a stop string
        self.num_reasoning_tokens = 0
        self._carry: list[StreamDelta] = []
        if self.parser is not None and generation.prefill_token_ids:
            self._carry = self.parser.feed(generation.prefill_token_ids)  # e.g. the named tool call's start

    def add(self, chunk: ModelChunk) -> ChoiceEvent:
        deltas, self._carry = self._carry, []
        logprobs: list[TokenLogprobs] = []
        for i, token in enumerate(chunk.token_ids):
            if self.stopped:
                break
            token_deltas = self._token_deltas(token)
            if any(isinstance(d, TextDelta) and d.channel == "analysis" for d in token_deltas):
                self.num_reasoning_tokens += 1
            if chunk.logprobs is not None and self._is_answer(token_deltas):
                logprobs.append(chunk.logprobs[i])
            deltas += token_deltas
        finish_reason = "stop" if self.stopped else None
        if finish_reason is None and chunk.finish_reason is not None:
            deltas += self._flush()
            finish_reason = self._finish_reason(chunk)
        usage = ChoiceUsage(chunk.num_prompt_tokens, chunk.num_output_tokens, chunk.num_cached_tokens,
                            self.num_reasoning_tokens)
        if not self.generation.include_reasoning:
            deltas = [d for d in deltas if not (isinstance(d, TextDelta) and d.channel == "analysis")]
        return ChoiceEvent(self.index, chunk.token_ids, tuple(merge_deltas(deltas)), tuple(logprobs),
                           finish_reason, usage, chunk.replica_id)

    def _token_deltas(self, token: int) -> list[StreamDelta]:
        if self.parser is not None:
            deltas = self.parser.feed(token)
        else:
            text = self.decoder.feed([token])
            deltas = [TextDelta("final", text)] if text else []
        return self._apply_stop(deltas)

    def _apply_stop(self, deltas: list[StreamDelta]) -> list[StreamDelta]:
        if self.stop is None:
            return deltas
        out: list[StreamDelta] = []
        for delta in deltas:
            if isinstance(delta, TextDelta) and delta.channel == "final":
                text, hit = self.stop.feed(delta.text)
                if text:
                    out.append(TextDelta("final", text))
                if hit:
                    self.stopped = True
                    break
            else:
                out.append(delta)
        return out

    @staticmethod
    def _is_answer(deltas: list[StreamDelta]) -> bool:
        return any(isinstance(d, TextDelta) and d.channel != "analysis" or isinstance(d, ToolCallArgsDelta)
                   for d in deltas)

    def _flush(self) -> list[StreamDelta]:
        if self.parser is not None:
            deltas = self.parser.finish()
        else:
            text = self.decoder.flush()
            deltas = [TextDelta("final", text)] if text else []
        deltas = self._apply_stop(deltas)
        if self.stop is not None and not self.stopped:
            held = self.stop.flush()
            if held:
                deltas.append(TextDelta("final", held))
        return deltas

    def _finish_reason(self, chunk: ModelChunk) -> str:
        if chunk.finish_reason == "abort":  # the model server aborted it (draining)
            raise UnavailableError("the model server aborted the request (it is shutting down); retry")
        if chunk.finish_reason == "stop" and self.parser is not None and chunk.token_ids[-1:] == (CALL_ID,):
            return "tool_calls"
        return chunk.finish_reason


@dataclass(frozen=True)
class ToolChoice:
    mode: str = "auto"  # "auto", "none" (tools not shown to the model), "required", "function"
    name: str | None = None  # mode "function": the function to call


def render_chat(messages: list[ChatMessage], tools: list[FunctionTool], tool_choice: ToolChoice,
                reasoning_effort: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(prompt token ids, prefill) for a chat: harmony's rendering with today's date, then for
    tool_choice "required" or a named function the start of a tool call (the model cannot answer
    otherwise: there is no guided decoding here).

    Raises:
        InvalidRequestError naming "messages", "tools" or "tool_choice".
    """
    names = [tool.name for tool in tools]
    if len(set(names)) != len(names):
        raise InvalidRequestError("tools", f"tools must have distinct names, got {names}")
    if tool_choice.mode in ("required", "function") and not tools:
        raise InvalidRequestError("tool_choice", f"tool_choice {tool_choice.mode!r} needs tools, got none")
    if tool_choice.mode == "function" and tool_choice.name not in names:
        raise InvalidRequestError("tool_choice", f"tool_choice names function {tool_choice.name!r}, which is not "
                                                 f"among the tools {names}")
    try:
        prompt = render_prompt(messages, tools=() if tool_choice.mode == "none" else tools,
                               reasoning_effort=reasoning_effort, current_date=time.strftime("%Y-%m-%d", time.gmtime()))
    except ValueError as e:
        raise InvalidRequestError("messages", str(e)) from None
    prefill: list[int] = []
    if tool_choice.mode in ("required", "function"):
        prefill = tool_call_prefill(tool_choice.name)
    return tuple(prompt + prefill), tuple(prefill)


def allow_everyone(credential: str | None) -> str:
    """The authenticator when no API keys are configured: everyone is the one tenant ""."""
    return ""


def build_authenticator(config: AppConfig) -> Callable[[str | None], str]:
    auth = config.auth
    if not auth.enabled:
        return allow_everyone
    return ApiKeys(auth.api_keys_file, auth.api_keys_env, auth.reload_period_s).check


class RecentFailures:
    """Model server replicas whose group this gateway replica saw fail, for a while: new requests ask
    the router to avoid them until Serve's health check has replaced them (new replicas, new ids)."""

    def __init__(self, remember_s: float = 60.0):
        self.remember_s = remember_s
        self._until: dict[str, float] = {}

    def note(self, replica_id: str) -> None:
        if replica_id:
            self._until[replica_id] = time.monotonic() + self.remember_s

    def current(self) -> tuple[str, ...]:
        if not self._until:
            return ()
        now = time.monotonic()
        self._until = {rid: until for rid, until in self._until.items() if until > now}
        return tuple(self._until)


@dataclass
class _OpenRequest:
    streams: list  # the request's DeploymentResponseGenerators
    aborted: bool = False


class Pipeline:
    """One per gateway replica. `run` streams a generation's events; `abort` ends a running one."""

    def __init__(self, model_server, config: AppConfig,
                 authenticate: Callable[[str | None], str] | None = None):
        self.model_server = model_server  # DeploymentHandle of the ModelServer deployment
        self._streaming = model_server.options(stream=True)
        self.model_name = config.served_model_name()
        self.limits = config.gateway
        self.auth = config.auth
        self.block_size = config.engine.block_size
        self.prefix_blocks = config.model_server.router.prefix_blocks
        self._authenticate = authenticate or build_authenticator(config)
        self.metrics = GatewayMetrics(self.model_name)
        self._failed_replicas = RecentFailures()
        self._info: ModelInfo | None = None
        self._open: dict[str, _OpenRequest] = {}

    def authenticate(self, credential: str | None) -> str:
        """The caller's tenant. Raises AuthenticationError unless the credential (an API key) is accepted."""
        try:
            return self._authenticate(credential)
        except AuthenticationError:
            raise
        except Exception as e:  # an authenticator's bug must not let a request in
            raise AuthenticationError("the credential could not be checked") from e

    def authenticate_health(self, credential: str | None) -> None:
        """Health endpoints answer without a key unless `auth.public_health` is off."""
        if not self.auth.public_health:
            self.authenticate(credential)

    def check_model(self, model: str | None) -> None:
        if model and model != self.model_name:
            raise NotFoundError(f"model {model!r} is not served here; the models are: [{self.model_name!r}] "
                                f"(GET /v1/models)", "model")

    async def info(self) -> ModelInfo:
        """The served model's facts, asked of a model server replica once (it waits for one to be up)."""
        if self._info is None:
            self._info = await self.model_server.get_info.remote()
        return self._info

    async def healthy(self) -> bool:
        """Whether a model server replica answers with a healthy EP group."""
        try:
            health = await asyncio.wait_for(self.model_server.health.remote(), timeout=_HEALTH_TIMEOUT_S)
        except Exception:  # noqa: BLE001 - any failure to answer is "not healthy"
            return False
        return health.healthy

    async def check_lengths(self, generation: Generation) -> Generation:
        """Refuses, before any work, a prompt or max_tokens that cannot fit the model's context or the
        gateway's limits; returns the generation with max_tokens capped by `max_output_tokens`."""
        info = await self.info()
        num_prompt = len(generation.prompt_token_ids)
        prompt_field = "messages" if generation.harmony else "prompt"
        limits = self.limits
        if limits.max_prompt_tokens is not None and num_prompt > limits.max_prompt_tokens:
            raise ContextLengthError(f"the prompt has {num_prompt} tokens; this server accepts at most "
                                     f"{limits.max_prompt_tokens} (gateway.max_prompt_tokens)", prompt_field)
        if num_prompt >= info.max_model_len:
            raise ContextLengthError(
                f"This model's maximum context length is {info.max_model_len} tokens; the prompt has "
                f"{num_prompt} tokens and at least one must be generated", prompt_field)
        max_tokens = generation.sampling.max_tokens
        if limits.max_output_tokens is not None:
            if max_tokens is not None and max_tokens > limits.max_output_tokens:
                raise InvalidRequestError("max_tokens", f"max_tokens must be <= {limits.max_output_tokens} "
                                                        f"(gateway.max_output_tokens), got {max_tokens}")
            if max_tokens is None:
                max_tokens = min(limits.max_output_tokens, info.max_model_len - num_prompt)
                generation = dataclasses.replace(
                    generation, sampling=dataclasses.replace(generation.sampling, max_tokens=max_tokens))
        if max_tokens is not None and num_prompt + max_tokens > info.max_model_len:
            raise ContextLengthError(
                f"This model's maximum context length is {info.max_model_len} tokens; the prompt has "
                f"{num_prompt} tokens and max_tokens asks for {max_tokens} more (at most "
                f"{info.max_model_len - num_prompt})", "max_tokens")
        bad = [t for t in generation.prompt_token_ids if not 0 <= t < info.vocab_size]
        if bad:
            raise InvalidRequestError("prompt", f"prompt token ids must be in [0, {info.vocab_size}), got {bad[:5]}")
        if generation.sampling.logprobs is not None and generation.sampling.logprobs > info.max_logprobs:
            raise InvalidRequestError("top_logprobs", f"top_logprobs must be <= {info.max_logprobs}, "
                                                      f"got {generation.sampling.logprobs}")
        if generation.n > limits.max_n:
            raise InvalidRequestError("n", f"n must be <= {limits.max_n}, got {generation.n}")
        return generation

    async def run(self, generation: Generation) -> AsyncIterator[ChoiceEvent]:
        """The generation's events, choices interleaved as they arrive; leaving early cancels it all.

        Raises:
            ClientError (names the field), UnavailableError, and what the model server raised.
        """
        generation = await self.check_lengths(generation)
        if generation.request_id in self._open:
            raise InvalidRequestError("request_id", f"request_id {generation.request_id!r} is already running")
        request = self._open[generation.request_id] = _OpenRequest([])
        try:
            choices = [self._run_choice(generation, i, request) for i in range(generation.n)]
            async for _, event in interleave(choices):
                yield event
        finally:
            del self._open[generation.request_id]
            for stream in request.streams:
                stream.cancel()  # no-op for streams that ended; aborts the rest in their engines

    def abort(self, request_id: str) -> bool:
        """Ends a running generation: each open choice's last event has finish_reason "abort"."""
        request = self._open.get(request_id)
        if request is None:
            return False
        request.aborted = True
        for stream in request.streams:
            stream.cancel()
        return True

    def _model_request(self, generation: Generation, index: int) -> ModelRequest:
        sampling = generation.sampling
        if index and sampling.seed is not None:
            sampling = dataclasses.replace(sampling, seed=(sampling.seed + index) % 2**63)
        keys = prefix_routing_keys(generation.prompt_token_ids, self.block_size, generation.cache_salt,
                                   self.prefix_blocks)
        return ModelRequest(f"{generation.request_id}-{index}", generation.prompt_token_ids, sampling,
                            generation.cache_salt, keys, self._failed_replicas.current())

    async def _run_choice(self, generation: Generation, index: int, request: _OpenRequest
                          ) -> AsyncIterator[ChoiceEvent]:
        model_request = self._model_request(generation, index)
        assembler = ChoiceAssembler(index, generation)
        for attempt in range(self.limits.max_retries + 1):
            stream = self._streaming.generate.remote(model_request)
            request.streams.append(stream)
            started = False
            try:
                async for chunk in stream:
                    started = True
                    event = assembler.add(chunk)
                    yield event
                    if event.finish_reason is not None:
                        return
            except (RequestCancelledError, asyncio.CancelledError):
                if not request.aborted:
                    raise
                break
            except Exception as e:
                cause = unwrap(e)
                if isinstance(cause, ReplicaUnavailableError):
                    self._failed_replicas.note(cause.replica_id)  # route around it until Serve replaces it
                if started or request.aborted or attempt == self.limits.max_retries or not _retryable(e):
                    raise
                if isinstance(cause, ReplicaUnavailableError):
                    model_request = dataclasses.replace(
                        model_request, avoid_replica_ids=(*model_request.avoid_replica_ids, cause.replica_id))
                logger.warning("a model server replica failed before the first token (%s); retrying "
                               "elsewhere (%d of %d)", type(cause).__name__, attempt + 1, self.limits.max_retries)
                continue
            break
        # Aborted: the model server's stream ended early.
        yield ChoiceEvent(index, (), (), (), "abort", ChoiceUsage(len(generation.prompt_token_ids), 0, 0, 0))


def _retryable(exc: BaseException) -> bool:
    """A failure of the replica, not of the request: another group may serve it."""
    cause = unwrap(exc)
    return isinstance(cause, ReplicaUnavailableError | DeploymentUnavailableError | ray.exceptions.RayActorError
                      | ray.exceptions.ActorUnavailableError)


async def interleave(iterators: list[AsyncIterator]) -> AsyncIterator[tuple[int, object]]:
    """(source index, item) from several async iterators as items arrive; the first error ends it all,
    and leaving early closes every source."""
    if len(iterators) == 1:
        async for item in iterators[0]:
            yield 0, item
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def drain(source: int, iterator: AsyncIterator) -> None:
        try:
            async for item in iterator:
                queue.put_nowait((source, item))
            queue.put_nowait((source, done))
        except Exception as e:  # noqa: BLE001 - re-raised by the reader below
            queue.put_nowait((source, e))

    tasks = [asyncio.create_task(drain(i, it)) for i, it in enumerate(iterators)]
    try:
        remaining = len(tasks)
        while remaining:
            source, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield source, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
