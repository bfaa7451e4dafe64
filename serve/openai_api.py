"""The OpenAI-compatible HTTP API: FastAPI routes over the gateway's pipeline.

POST /v1/chat/completions, POST /v1/completions (text or token-id prompts, no template), GET /v1/models,
GET /v1/models/{id}, GET /health. Errors are OpenAI's JSON error body with the matching status;
streams are server-sent events ending with `data: [DONE]`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import math
from collections.abc import AsyncIterator
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from engine.sampling_params import SamplingParams
from gptoss.errors import DeadlineExceededError, InvalidRequestError, NotFoundError, PayloadTooLargeError
from gptoss.harmony import ChatMessage, FunctionTool, TextDelta, ToolCall
from gptoss.tokenizer import encode
from serve.config import describe_validation_error
from serve.errors import error_reply
from serve.gateway import ChoiceEvent, ChoiceUsage, Generation, Pipeline, ToolChoice, interleave, render_chat
from serve.openai_protocol import (
    ChatChoiceAccumulator,
    ChatCompletionRequest,
    ChatDeltaBuilder,
    ChatMessageIn,
    CompletionRequest,
    NamedToolChoice,
    chat_logprobs,
    completion_logprobs,
    new_id,
    now_s,
    usage_body,
)

ModelT = TypeVar("ModelT", bound=BaseModel)
REPLICA_HEADER = "x-gptoss-replica"


def make_openai_app(pipeline: Pipeline, max_request_bytes: int) -> FastAPI:
    """The FastAPI app of one gateway replica, over its pipeline."""
    app = FastAPI(title="gptoss-serve", description="OpenAI-compatible API for gpt-oss")
    app.state.pipeline = pipeline
    app.state.max_request_bytes = max_request_bytes
    app.state.started_at = now_s()
    app.add_api_route("/v1/chat/completions", chat_completions, methods=["POST"])
    app.add_api_route("/v1/completions", completions, methods=["POST"])
    app.add_api_route("/v1/models", list_models, methods=["GET"])
    app.add_api_route("/v1/models/{model_id:path}", get_model, methods=["GET"])
    app.add_api_route("/health", health, methods=["GET"])
    app.add_exception_handler(StarletteHTTPException, _http_exception)
    return app


# --- routes -----------------------------------------------------------------------------------------

async def chat_completions(request: Request) -> Response:
    pipeline: Pipeline = request.app.state.pipeline
    pipeline.metrics.request("chat")
    try:
        tenant = pipeline.authenticate(bearer_token(request))
        chat = parse_body(ChatCompletionRequest, await read_json(request))
        pipeline.check_model(chat.model)
        generation = dataclasses.replace(chat_generation(chat), cache_salt=tenant)
        events = with_deadline(pipeline.run(generation), chat.timeout)
        if not chat.stream:
            body, replica = await collect_chat(events, generation, chat, pipeline.model_name)
            return JSONResponse(body, headers=replica_header(replica))
        first = await anext(events)  # errors before the first token still get their HTTP status
        return event_stream(chat_chunks(first, events, generation, chat, pipeline.model_name),
                            pipeline, "chat", first.replica_id)
    except Exception as e:  # noqa: BLE001 - every failure becomes an OpenAI error body
        return error_response(e, pipeline, "chat")


async def completions(request: Request) -> Response:
    pipeline: Pipeline = request.app.state.pipeline
    pipeline.metrics.request("completions")
    try:
        tenant = pipeline.authenticate(bearer_token(request))
        req = parse_body(CompletionRequest, await read_json(request))
        pipeline.check_model(req.model)
        request_id = new_id("cmpl")
        generations = completion_generations(req, request_id, tenant)
        events = with_deadline(interleave([pipeline.run(g) for g in generations]), req.timeout)
        if not req.stream:
            body, replica = await collect_completion(events, req, request_id, pipeline.model_name)
            return JSONResponse(body, headers=replica_header(replica))
        first = await anext(events)
        return event_stream(completion_chunks(first, events, req, request_id, pipeline.model_name),
                            pipeline, "completions", first[1].replica_id)
    except Exception as e:  # noqa: BLE001
        return error_response(e, pipeline, "completions")


async def list_models(request: Request) -> Response:
    pipeline: Pipeline = request.app.state.pipeline
    try:
        pipeline.authenticate(bearer_token(request))
        return JSONResponse({"object": "list", "data": [await model_card(request)]})
    except Exception as e:  # noqa: BLE001
        return error_response(e, pipeline, "models")


async def get_model(request: Request, model_id: str) -> Response:
    pipeline: Pipeline = request.app.state.pipeline
    try:
        pipeline.authenticate(bearer_token(request))
        pipeline.check_model(model_id)
        return JSONResponse(await model_card(request))
    except Exception as e:  # noqa: BLE001
        return error_response(e, pipeline, "models")


async def health(request: Request) -> Response:
    """200 when a model server replica answers with a healthy EP group, else 503."""
    pipeline: Pipeline = request.app.state.pipeline
    try:
        pipeline.authenticate_health(bearer_token(request))
    except Exception as e:  # noqa: BLE001
        return error_response(e, pipeline, "health")
    if await pipeline.healthy():
        return JSONResponse({"status": "ok"})
    return JSONResponse({"status": "unavailable"}, status_code=503)


def replica_header(replica_id: str) -> dict[str, str] | None:
    """Which model server replica (EP group) served the request: for operators tracing a request."""
    return {REPLICA_HEADER: replica_id} if replica_id else None


async def model_card(request: Request) -> dict:
    pipeline: Pipeline = request.app.state.pipeline
    card = {"id": pipeline.model_name, "object": "model", "created": request.app.state.started_at,
            "owned_by": "gptoss-serve"}
    with contextlib.suppress(asyncio.TimeoutError):  # no replica up yet: the card without the length
        card["max_model_len"] = (await asyncio.wait_for(pipeline.info(), timeout=2.0)).max_model_len
    return card


# --- requests ----------------------------------------------------------------------------------------

def bearer_token(request: Request) -> str | None:
    value = request.headers.get("authorization", "")
    scheme, _, token = value.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


async def read_json(request: Request) -> Any:
    """The body as JSON, refusing bodies over the limit before reading them whole."""
    limit = request.app.state.max_request_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLargeError(f"the request body has {declared} bytes; at most {limit} are accepted")
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > limit:
            raise PayloadTooLargeError(f"the request body is larger than the {limit} bytes accepted")
    try:
        data = json.loads(bytes(body).decode("utf-8"))
    except UnicodeDecodeError as e:
        raise InvalidRequestError("body", f"the request body must be UTF-8 JSON: byte {e.start} is not UTF-8") from None
    except json.JSONDecodeError as e:
        raise InvalidRequestError("body", f"the request body must be JSON: {e}") from None
    if not isinstance(data, dict):
        raise InvalidRequestError("body", f"the request body must be a JSON object, got {type(data).__name__}")
    return data


def parse_body(model: type[ModelT], body: dict) -> ModelT:
    try:
        return model.model_validate(body)
    except ValidationError as e:
        raise InvalidRequestError(_param(e), "; ".join(describe_validation_error(e))) from None


def _param(error: ValidationError) -> str:
    """The first problem's field as a dotted path, without pydantic's union-member tags."""
    parts = [str(p) for p in error.errors()[0]["loc"]]
    kept = [p for p in parts if not ("[" in p or p in ("str", "int", "float", "bool", "list", "dict")
                                     or p.startswith("function-") or p[:1].isupper())]
    return ".".join(kept) or "body"


def sampling_params(**fields) -> SamplingParams:
    """SamplingParams, whose checks name the field (e.g. "temperature must be ...")."""
    return SamplingParams(**fields)


def chat_generation(chat: ChatCompletionRequest) -> Generation:
    messages = [chat_message(m, i) for i, m in enumerate(chat.messages)]
    tools = []
    for i, tool in enumerate(chat.tools or []):
        try:
            tools.append(FunctionTool(tool.function.name, tool.function.description, tool.function.parameters))
        except ValueError as e:
            raise InvalidRequestError(f"tools.{i}.function.name", f"tools.{i}.function.{e}") from None
    if isinstance(chat.tool_choice, NamedToolChoice):
        tool_choice = ToolChoice("function", chat.tool_choice.function.name)
    else:
        tool_choice = ToolChoice(chat.tool_choice or ("auto" if tools else "none"))
    prompt, prefill = render_chat(messages, tools, tool_choice, chat.reasoning_effort)
    sampling = sampling_params(max_tokens=chat.output_limit, temperature=chat.temperature, top_p=chat.top_p,
                               top_k=chat.top_k, min_p=chat.min_p, presence_penalty=chat.presence_penalty,
                               frequency_penalty=chat.frequency_penalty, seed=chat.seed, logprobs=chat.num_logprobs)
    return Generation(new_id("chatcmpl"), prompt, sampling, chat.n, chat.stop_strings(), harmony=True,
                      prefill_token_ids=prefill, include_reasoning=chat.include_reasoning)


def chat_message(m: ChatMessageIn, i: int) -> ChatMessage:
    try:
        calls = tuple(ToolCall(c.function.name, c.function.arguments, c.id) for c in m.tool_calls or ())
        return ChatMessage(m.role, m.text(), name=m.name if m.role == "tool" else None, tool_calls=calls,
                           tool_call_id=m.tool_call_id, reasoning=m.reasoning or m.reasoning_content)
    except ValueError as e:
        raise InvalidRequestError(f"messages.{i}", f"messages.{i}: {e}") from None


def completion_generations(req: CompletionRequest, request_id: str, tenant: str = "") -> list[Generation]:
    sampling = sampling_params(max_tokens=req.max_tokens, temperature=req.temperature, top_p=req.top_p,
                               top_k=req.top_k, min_p=req.min_p, presence_penalty=req.presence_penalty,
                               frequency_penalty=req.frequency_penalty, seed=req.seed, logprobs=req.logprobs,
                               stop_token_ids=())  # raw text: the engine stops at max_tokens or a stop string
    generations = []
    for i, prompt in enumerate(req.prompts()):
        ids = encode(prompt) if isinstance(prompt, str) else prompt
        if not ids:
            raise InvalidRequestError("prompt", "prompt must not be empty")
        generations.append(Generation(f"{request_id}-{i}", tuple(ids), sampling, req.n, req.stop_strings(),
                                      harmony=False, cache_salt=tenant))
    return generations


async def with_deadline(events: AsyncIterator, timeout_s: float | None) -> AsyncIterator:
    """The events, ended by DeadlineExceededError `timeout_s` after the start (the request is aborted)."""
    if timeout_s is None:
        async for event in events:
            yield event
        return
    try:
        async with asyncio.timeout(timeout_s):
            async for event in events:
                yield event
    except TimeoutError:
        raise DeadlineExceededError(f"the request ran past its timeout of {timeout_s:g} s and was aborted") from None
    finally:
        await events.aclose()


# --- responses ---------------------------------------------------------------------------------------

def error_response(exc: BaseException, pipeline: Pipeline | None = None, api: str = "") -> JSONResponse:
    reply = error_reply(exc)
    if pipeline is not None:
        pipeline.metrics.error(api, reply.http_status)
    headers = {"Retry-After": str(math.ceil(reply.retry_after_s))} if reply.retry_after_s else None
    return JSONResponse(reply.openai_body(), status_code=reply.http_status, headers=headers)


async def _http_exception(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """FastAPI's own 404 / 405, in OpenAI's error shape."""
    error = NotFoundError(f"no route {request.method} {request.url.path}") if exc.status_code == 404 else None
    if error is not None:
        return error_response(error)
    body = {"error": {"message": str(exc.detail), "type": "invalid_request_error", "param": None, "code": None}}
    return JSONResponse(body, status_code=exc.status_code)


def event_stream(chunks: AsyncIterator[dict], pipeline: Pipeline, api: str, replica_id: str) -> StreamingResponse:
    async def sse() -> AsyncIterator[str]:
        try:
            async for chunk in chunks:
                yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
        except Exception as e:  # noqa: BLE001 - a stream that already started can only report in-band
            reply = error_reply(e)
            pipeline.metrics.error(api, reply.http_status)
            yield f"data: {json.dumps(reply.openai_body(), ensure_ascii=False)}\n\n"
        yield "data: [DONE]\n\n"

    headers = {"Cache-Control": "no-cache"} | (replica_header(replica_id) or {})
    return StreamingResponse(sse(), media_type="text/event-stream", headers=headers)


async def _chain(first: Any, rest: AsyncIterator) -> AsyncIterator:
    yield first
    async for item in rest:
        yield item


async def collect_chat(events: AsyncIterator[ChoiceEvent], generation: Generation, chat: ChatCompletionRequest,
                       model: str) -> tuple[dict, str]:
    """(the chat.completion body, the replica that served the first choice)."""
    builder = ChatDeltaBuilder(chat.include_reasoning)
    choices = [ChatChoiceAccumulator(i, builder, chat.logprobs) for i in range(chat.n)]
    replica = ""
    async for event in events:
        choices[event.index].add(event)
        replica = replica or event.replica_id
    return {"id": generation.request_id, "object": "chat.completion", "created": now_s(), "model": model,
            "choices": [c.body() for c in choices], "usage": usage_body([c.usage for c in choices], chat.n)}, replica


async def chat_chunks(first: ChoiceEvent, events: AsyncIterator[ChoiceEvent], generation: Generation,
                      chat: ChatCompletionRequest, model: str) -> AsyncIterator[dict]:
    builder = ChatDeltaBuilder(chat.include_reasoning)
    base = {"id": generation.request_id, "object": "chat.completion.chunk", "created": now_s(), "model": model}
    include_usage, every_chunk = usage_options(chat)
    usages: list[ChoiceUsage | None] = [None] * chat.n
    async for event in _chain(first, events):
        delta = builder.delta(event)
        usages[event.index] = event.usage
        if not delta and event.finish_reason is None and not event.logprobs and not every_chunk:
            continue  # harmony headers and held-back text: nothing to show yet
        choice = {"index": event.index, "delta": delta, "finish_reason": event.finish_reason,
                  "logprobs": {"content": chat_logprobs(event.logprobs)} if chat.logprobs else None}
        yield base | {"choices": [choice]} | chunk_usage(usages, chat.n, include_usage, every_chunk)
    if include_usage:
        yield base | {"choices": [], "usage": usage_body(usages, chat.n)}


def usage_options(request) -> tuple[bool, bool]:
    """(a usage chunk at the end, usage on every chunk: vLLM's continuous_usage_stats)."""
    options = request.stream_options
    return (options is not None and options.include_usage,
            options is not None and options.include_usage and options.continuous_usage_stats)


def chunk_usage(usages: list, n: int, include_usage: bool, every_chunk: bool) -> dict:
    if every_chunk:
        return {"usage": usage_body(usages, n)}
    return {"usage": None} if include_usage else {}


async def collect_completion(events: AsyncIterator, req: CompletionRequest, request_id: str,
                             model: str) -> tuple[dict, str]:
    """(the text_completion body, the replica that served the first choice)."""
    num_choices = len(req.prompts()) * req.n
    replica = ""
    texts: list[list[str]] = [[] for _ in range(num_choices)]
    logprobs: list[list] = [[] for _ in range(num_choices)]
    finish: list[str | None] = [None] * num_choices
    usages: list[ChoiceUsage | None] = [None] * num_choices
    async for source, event in events:
        index = source * req.n + event.index
        replica = replica or event.replica_id
        texts[index] += [d.text for d in event.deltas if isinstance(d, TextDelta)]
        logprobs[index] += event.logprobs
        if event.finish_reason is not None:
            finish[index], usages[index] = event.finish_reason, event.usage
    choices = [{"index": i, "text": "".join(texts[i]), "finish_reason": finish[i],
                "logprobs": completion_logprobs(tuple(logprobs[i]), 0) if req.logprobs is not None else None}
               for i in range(num_choices)]
    return {"id": request_id, "object": "text_completion", "created": now_s(), "model": model, "choices": choices,
            "usage": usage_body(usages, req.n)}, replica


async def completion_chunks(first: tuple, events: AsyncIterator, req: CompletionRequest, request_id: str,
                            model: str) -> AsyncIterator[dict]:
    base = {"id": request_id, "object": "text_completion", "created": now_s(), "model": model}
    include_usage, every_chunk = usage_options(req)
    num_choices = len(req.prompts()) * req.n
    offsets = [0] * num_choices
    usages: list[ChoiceUsage | None] = [None] * num_choices
    async for source, event in _chain(first, events):
        index = source * req.n + event.index
        text = "".join(d.text for d in event.deltas if isinstance(d, TextDelta))
        usages[index] = event.usage
        if not text and event.finish_reason is None and not every_chunk:
            continue
        choice = {"index": index, "text": text, "finish_reason": event.finish_reason,
                  "logprobs": completion_logprobs(event.logprobs, offsets[index]) if req.logprobs is not None
                  else None}
        offsets[index] += len(text)
        yield base | {"choices": [choice]} | chunk_usage(usages, req.n, include_usage, every_chunk)
    if include_usage:
        yield base | {"choices": [], "usage": usage_body(usages, req.n)}
