"""The OpenAI-compatible HTTP API: FastAPI routes over the gateway service.

POST /v1/chat/completions, POST /v1/completions (text or token-id prompts, no template), the Responses
API (POST /v1/responses; GET and DELETE /v1/responses/{id}; GET /v1/responses/{id}/input_items),
GET /v1/models, GET /v1/models/{id}, GET /health, GET /metrics. Errors are OpenAI's JSON error body with the matching
status; streams are server-sent events ending with `data: [DONE]`. Every response carries the request's
id in `x-request-id` (the client's own when it sent one): server errors quote it, and the gateway's log
has their cause under it.

A route reads the body (refused by size before it is read whole) and hands the bytes to admission
(serve/openai_protocol.py, in an admission worker); it never parses or renders on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from gptoss.errors import (
    DeadlineExceededError,
    InvalidRequestError,
    NotFoundError,
    PayloadTooLargeError,
    shorten,
)
from gptoss.harmony import TextDelta
from serve.admission import Generation, check_model
from serve.choices import ChoiceEvent, ChoiceUsage
from serve.errors import error_reply
from serve.gateway import GatewayService, interleave
from serve.metrics import scrape_gptoss_metrics
from serve.openai_protocol import (
    ChatChoiceAccumulator,
    ChatDeltaBuilder,
    ResponseOptions,
    admit_chat_json,
    admit_completion_json,
    chat_logprobs,
    completion_logprobs,
    now_s,
    usage_body,
)
from serve.responses_protocol import ResponseBuilder, admit_responses_json, failure_code

REPLICA_HEADER = "x-gptoss-replica"
REQUEST_ID_HEADER = "x-request-id"
MAX_REQUEST_ID_CHARS = 128


def make_openai_app(gateway: GatewayService) -> FastAPI:
    """The FastAPI app of one gateway replica."""
    docs = gateway.config.gateway.api_docs
    if docs is None:  # an open schema of a keyed server tells strangers what it serves
        docs = not gateway.config.auth.enabled
    app = FastAPI(title="gptoss-serve", description="OpenAI-compatible API for gpt-oss",
                  docs_url="/docs" if docs else None, redoc_url="/redoc" if docs else None,
                  openapi_url="/openapi.json" if docs else None)
    app.state.gateway = gateway
    app.state.started_at = now_s()
    app.add_api_route("/v1/chat/completions", chat_completions, methods=["POST"])
    app.add_api_route("/v1/completions", completions, methods=["POST"])
    app.add_api_route("/v1/responses", create_response, methods=["POST"])
    app.add_api_route("/v1/responses/{response_id}", get_response, methods=["GET"])
    app.add_api_route("/v1/responses/{response_id}", delete_response, methods=["DELETE"])
    app.add_api_route("/v1/responses/{response_id}/input_items", list_input_items, methods=["GET"])
    app.add_api_route("/v1/models", list_models, methods=["GET"])
    app.add_api_route("/v1/models/{model_id:path}", get_model, methods=["GET"])
    app.add_api_route("/health", health, methods=["GET"])
    if gateway.config.gateway.metrics_endpoint:
        app.add_api_route("/metrics", metrics, methods=["GET"])
    app.add_exception_handler(StarletteHTTPException, _http_exception)
    return app


# --- routes -----------------------------------------------------------------------------------------

async def chat_completions(request: Request) -> Response:
    gateway: GatewayService = request.app.state.gateway
    request_id, headers = request_id_of(request)
    gateway.metrics.request("chat")
    try:
        tenant = gateway.authenticate(bearer_token(request))
        body = await read_body(request, gateway.limits.max_request_bytes)
        generation, options = await gateway.admit(admit_chat_json, body, request_id, tenant)
        events = with_deadline(gateway.run(generation), options.timeout_s)
        if not options.stream:
            reply, replica = await collect_chat(events, generation, options, gateway.model_name)
            return JSONResponse(reply, headers=headers | replica_header(replica))
        first = await anext(events)  # errors before the first token still get their HTTP status
        chunks = chat_chunks(first, events, generation, options, gateway.model_name)
        return event_stream(chunks, gateway, "chat", request_id, headers | replica_header(first.replica_id))
    except Exception as e:  # noqa: BLE001 - every failure becomes an OpenAI error body
        return error_response(e, gateway, "chat", request_id, headers)


async def completions(request: Request) -> Response:
    gateway: GatewayService = request.app.state.gateway
    request_id, headers = request_id_of(request)
    gateway.metrics.request("completions")
    try:
        tenant = gateway.authenticate(bearer_token(request))
        body = await read_body(request, gateway.limits.max_request_bytes)
        generations, options = await gateway.admit(admit_completion_json, body, request_id, tenant)
        events = with_deadline(interleave([gateway.run(g) for g in generations]), options.timeout_s)
        if not options.stream:
            reply, replica = await collect_completion(events, generations, options, request_id, gateway.model_name)
            return JSONResponse(reply, headers=headers | replica_header(replica))
        first = await anext(events)
        chunks = completion_chunks(first, events, generations, options, request_id, gateway.model_name)
        return event_stream(chunks, gateway, "completions", request_id, headers | replica_header(first[1].replica_id))
    except Exception as e:  # noqa: BLE001
        return error_response(e, gateway, "completions", request_id, headers)


async def create_response(request: Request) -> Response:
    gateway: GatewayService = request.app.state.gateway
    request_id, headers = request_id_of(request)
    gateway.metrics.request("responses")
    try:
        tenant = gateway.authenticate(bearer_token(request))
        body = await read_body(request, gateway.limits.max_request_bytes)
        call, generation, conversation = await gateway.admit_response(admit_responses_json, body, request_id, tenant)
        builder = ResponseBuilder(call, gateway.model_name, gateway.block_size)
        events = with_deadline(gateway.respond(call, generation, conversation, tenant, builder), call.timeout_s)
        if not call.stream:
            async with contextlib.aclosing(events):
                async for _ in events:
                    pass
            return JSONResponse(builder.response, headers=headers | replica_header(builder.replica_id))
        # Errors before the model's first output still get their HTTP status.
        head = [await anext(events), await anext(events), await anext(events)]
        stream = response_events(head, events, builder, gateway, request_id)
        return StreamingResponse(stream, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"} | headers | replica_header(builder.replica_id))
    except Exception as e:  # noqa: BLE001
        return error_response(e, gateway, "responses", request_id, headers)


async def get_response(request: Request, response_id: str) -> Response:
    gateway: GatewayService = request.app.state.gateway
    request_id, headers = request_id_of(request)
    try:
        tenant = gateway.authenticate(bearer_token(request))
        if request.query_params.get("stream", "false") != "false":
            raise InvalidRequestError("stream", "stream: a stored response is returned whole here (streaming it "
                                                "again is not supported)")
        record = await gateway.load_response(response_id, tenant)
        return JSONResponse(record["response"], headers=headers)
    except Exception as e:  # noqa: BLE001
        return error_response(e, gateway, "responses", request_id, headers)


async def delete_response(request: Request, response_id: str) -> Response:
    gateway: GatewayService = request.app.state.gateway
    request_id, headers = request_id_of(request)
    try:
        await gateway.delete_response(response_id, gateway.authenticate(bearer_token(request)))
        return JSONResponse({"id": response_id, "object": "response.deleted", "deleted": True}, headers=headers)
    except Exception as e:  # noqa: BLE001
        return error_response(e, gateway, "responses", request_id, headers)


async def list_input_items(request: Request, response_id: str) -> Response:
    """The response's own input items, newest first unless `order=asc`, `limit` (1-100, default 20) at a
    time after the item id `after` (OpenAI's cursor paging)."""
    gateway: GatewayService = request.app.state.gateway
    request_id, headers = request_id_of(request)
    try:
        record = await gateway.load_response(response_id, gateway.authenticate(bearer_token(request)))
        query = request.query_params
        order, limit, after = query.get("order", "desc"), query.get("limit", "20"), query.get("after")
        if order not in ("asc", "desc"):
            raise InvalidRequestError("order", f"order must be asc or desc, got {shorten(order)}")
        if not limit.isdigit() or not 1 <= int(limit) <= 100:
            raise InvalidRequestError("limit", f"limit must be an integer in [1, 100], got {shorten(limit)}")
        items = record["input_items"][::-1] if order == "desc" else record["input_items"]
        if after is not None:
            ids = [item["id"] for item in items]
            if after not in ids:
                raise InvalidRequestError("after", f"after {shorten(after)} is not an input item of {response_id}")
            items = items[ids.index(after) + 1:]
        page = items[:int(limit)]
        return JSONResponse({"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
                             "last_id": page[-1]["id"] if page else None, "has_more": len(items) > len(page)},
                            headers=headers)
    except Exception as e:  # noqa: BLE001
        return error_response(e, gateway, "responses", request_id, headers)


async def list_models(request: Request) -> Response:
    gateway: GatewayService = request.app.state.gateway
    request_id, headers = request_id_of(request)
    try:
        gateway.authenticate(bearer_token(request))
        return JSONResponse({"object": "list", "data": [await model_card(request)]}, headers=headers)
    except Exception as e:  # noqa: BLE001
        return error_response(e, gateway, "models", request_id, headers)


async def get_model(request: Request, model_id: str) -> Response:
    gateway: GatewayService = request.app.state.gateway
    request_id, headers = request_id_of(request)
    try:
        gateway.authenticate(bearer_token(request))
        check_model(model_id, gateway.model_name)
        return JSONResponse(await model_card(request), headers=headers)
    except Exception as e:  # noqa: BLE001
        return error_response(e, gateway, "models", request_id, headers)


async def health(request: Request) -> Response:
    """200 while a model server replica serves (or the deployment is scaled to zero on purpose), else
    503: Serve's view of the replicas, never a call to one."""
    gateway: GatewayService = request.app.state.gateway
    request_id, headers = request_id_of(request)
    try:
        gateway.authenticate_health(bearer_token(request))
    except Exception as e:  # noqa: BLE001
        return error_response(e, gateway, "health", request_id, headers)
    fleet = await gateway.health()
    return JSONResponse(fleet.body(), status_code=200 if fleet.healthy else 503, headers=headers)


async def metrics(request: Request) -> Response:
    """The gptoss_* series of every node's Ray metrics export, in Prometheus' text format."""
    gateway: GatewayService = request.app.state.gateway
    request_id, headers = request_id_of(request)
    try:
        gateway.authenticate_health(bearer_token(request))
        text = await scrape_gptoss_metrics()
    except Exception as e:  # noqa: BLE001
        return error_response(e, gateway, "metrics", request_id, headers)
    return PlainTextResponse(text, headers=headers, media_type="text/plain; version=0.0.4")


async def model_card(request: Request) -> dict:
    gateway: GatewayService = request.app.state.gateway
    card = {"id": gateway.model_name, "object": "model", "created": request.app.state.started_at,
            "owned_by": "gptoss-serve"}
    with contextlib.suppress(asyncio.TimeoutError):  # no replica up yet: the card without the model's figures
        info = await asyncio.wait_for(gateway.info(), timeout=2.0)
        card["max_model_len"] = info.max_model_len
        card["kernels"] = dict(info.kernels)
    return card


# --- requests ----------------------------------------------------------------------------------------

def request_id_of(request: Request) -> tuple[str, dict[str, str]]:
    """(the request's id, headers the response must add to carry it). Behind Serve's HTTP proxy every
    request has an `x-request-id` (the client's, or one the proxy made) and the proxy returns it on the
    response; a request without one gets a new id, sent back here."""
    value = request.headers.get(REQUEST_ID_HEADER)
    if value is None:
        request_id = uuid.uuid4().hex
        return request_id, {REQUEST_ID_HEADER: request_id}
    if len(value) <= MAX_REQUEST_ID_CHARS and value.isascii() and value.isprintable():
        return value, {}
    return uuid.uuid4().hex, {}  # not fit for logs: ours in the logs and error messages


def bearer_token(request: Request) -> str | None:
    value = request.headers.get("authorization", "")
    scheme, _, token = value.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


async def read_body(request: Request, limit: int) -> bytes:
    """The body's bytes, refusing bodies over `limit` before reading them whole."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLargeError(f"the request body has {declared} bytes; at most {limit} are accepted "
                                   f"(gateway.max_request_bytes)")
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > limit:
            raise PayloadTooLargeError(f"the request body is larger than the {limit} bytes accepted "
                                       f"(gateway.max_request_bytes)")
    return bytes(body)


async def with_deadline(events: AsyncIterator, timeout_s: float | None) -> AsyncIterator:
    """The events, ended by DeadlineExceededError `timeout_s` after the start (the request is aborted).
    The deadline is applied to each wait for the next event, in whichever task waits: a streamed
    response is iterated by Starlette in a task of its own, which a timeout entered once in the handler's
    task would never reach."""
    if timeout_s is None:
        async for event in events:
            yield event
        return
    deadline = asyncio.get_running_loop().time() + timeout_s
    try:
        while True:
            try:
                async with asyncio.timeout_at(deadline):
                    event = await anext(events)
            except StopAsyncIteration:
                return
            except TimeoutError:
                raise DeadlineExceededError(f"the request ran past its timeout of {timeout_s:g} s and was "
                                            f"aborted") from None
            yield event
    finally:
        await events.aclose()


# --- responses ---------------------------------------------------------------------------------------

def replica_header(replica_id: str) -> dict[str, str]:
    """Which model server replica (EP group) served the request: for operators tracing a request."""
    return {REPLICA_HEADER: replica_id} if replica_id else {}


def error_response(exc: BaseException, gateway: GatewayService | None = None, api: str = "", request_id: str = "",
                   headers: dict[str, str] | None = None) -> JSONResponse:
    reply = error_reply(exc, request_id)
    if gateway is not None:
        gateway.metrics.error(api, reply.http_status)
    headers = dict(headers or {})
    if reply.retry_after_s:
        headers["Retry-After"] = str(math.ceil(reply.retry_after_s))
    return JSONResponse(reply.openai_body(), status_code=reply.http_status, headers=headers)


async def _http_exception(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """FastAPI's own 404 / 405, in OpenAI's error shape."""
    if exc.status_code == 404:
        return error_response(NotFoundError(f"no route {request.method} {request.url.path[:200]}"))
    body = {"error": {"message": str(exc.detail), "type": "invalid_request_error", "param": None, "code": None}}
    return JSONResponse(body, status_code=exc.status_code)


def event_stream(chunks: AsyncIterator[dict], gateway: GatewayService, api: str, request_id: str,
                 headers: dict[str, str]) -> StreamingResponse:
    async def sse() -> AsyncIterator[str]:
        try:
            async with contextlib.aclosing(chunks):  # closed when left (a cancel thrown in at a yield)
                async for chunk in chunks:
                    yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
        except Exception as e:  # noqa: BLE001 - a stream that already started can only report in-band
            reply = error_reply(e, request_id)
            gateway.metrics.error(api, reply.http_status)
            yield f"data: {json.dumps(reply.openai_body(), ensure_ascii=False)}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"} | headers)


async def response_events(head: list[dict], events: AsyncIterator[dict], builder: ResponseBuilder,
                          gateway: GatewayService, request_id: str) -> AsyncIterator[str]:
    """A streamed response as OpenAI's server-sent events; a fault after the start ends it with
    `response.failed` (the client already has its 200)."""
    def sse(event: dict) -> str:
        return f"event: {event['type']}\ndata: {json.dumps(event, ensure_ascii=False)}\n\n"

    try:
        async with contextlib.aclosing(_chain(head, events)) as chained:
            async for event in chained:
                yield sse(event)
    except Exception as e:  # noqa: BLE001 - in-band, as the status was sent
        reply = error_reply(e, request_id)
        gateway.metrics.error("responses", reply.http_status)
        for event in builder.fail(reply.message, failure_code(reply.http_status)):
            yield sse(event)



async def _chain(first: Any, rest: AsyncIterator) -> AsyncIterator:
    """`first` (a list: each of its items), then what `rest` yields."""
    async with contextlib.aclosing(rest):
        for item in first if isinstance(first, list) else [first]:
            yield item
        async for item in rest:
            yield item


def _usage_options(options: ResponseOptions, n: int, usages: list) -> dict:
    if options.continuous_usage:
        return {"usage": usage_body(usages, n)}
    return {"usage": None} if options.include_usage else {}


async def collect_chat(events: AsyncIterator[ChoiceEvent], generation: Generation, options: ResponseOptions,
                       model: str) -> tuple[dict, str]:
    """(the chat.completion body, the replica that served the first choice)."""
    builder = ChatDeltaBuilder(generation.include_reasoning)
    choices = [ChatChoiceAccumulator(i, builder, options.logprobs) for i in range(generation.n)]
    replica = ""
    async for event in events:
        choices[event.index].add(event)
        replica = replica or event.replica_id
    return {"id": f"chatcmpl-{generation.request_id}", "object": "chat.completion", "created": now_s(),
            "model": model, "choices": [c.body() for c in choices],
            "usage": usage_body([c.usage for c in choices], generation.n)}, replica


async def chat_chunks(first: ChoiceEvent, events: AsyncIterator[ChoiceEvent], generation: Generation,
                      options: ResponseOptions, model: str) -> AsyncIterator[dict]:
    builder = ChatDeltaBuilder(generation.include_reasoning)
    base = {"id": f"chatcmpl-{generation.request_id}", "object": "chat.completion.chunk", "created": now_s(),
            "model": model}
    usages: list[ChoiceUsage | None] = [None] * generation.n
    async with contextlib.aclosing(_chain(first, events)) as chained:
        async for event in chained:
            delta = builder.delta(event)
            usages[event.index] = event.usage
            if not delta and event.finish_reason is None and not event.logprobs and not options.continuous_usage:
                continue  # harmony headers and held-back text: nothing to show yet
            choice = {"index": event.index, "delta": delta, "finish_reason": event.finish_reason,
                      "logprobs": {"content": chat_logprobs(event.logprobs)} if options.logprobs else None}
            yield base | {"choices": [choice]} | _usage_options(options, generation.n, usages)
    if options.include_usage:
        yield base | {"choices": [], "usage": usage_body(usages, generation.n)}


async def collect_completion(events: AsyncIterator, generations: tuple[Generation, ...], options: ResponseOptions,
                             request_id: str, model: str) -> tuple[dict, str]:
    """(the text_completion body, the replica that served the first choice)."""
    n = generations[0].n
    num_choices = len(generations) * n
    replica = ""
    texts: list[list[str]] = [[] for _ in range(num_choices)]
    logprobs: list[list] = [[] for _ in range(num_choices)]
    finish: list[str | None] = [None] * num_choices
    usages: list[ChoiceUsage | None] = [None] * num_choices
    async for source, event in events:
        index = source * n + event.index
        replica = replica or event.replica_id
        texts[index] += [d.text for d in event.deltas if isinstance(d, TextDelta)]
        logprobs[index] += event.logprobs
        if event.finish_reason is not None:
            finish[index], usages[index] = event.finish_reason, event.usage
    choices = [{"index": i, "text": "".join(texts[i]), "finish_reason": finish[i],
                "logprobs": completion_logprobs(tuple(logprobs[i]), 0) if options.logprobs else None}
               for i in range(num_choices)]
    return {"id": f"cmpl-{request_id}", "object": "text_completion", "created": now_s(), "model": model,
            "choices": choices, "usage": usage_body(usages, n)}, replica


async def completion_chunks(first: tuple, events: AsyncIterator, generations: tuple[Generation, ...],
                            options: ResponseOptions, request_id: str, model: str) -> AsyncIterator[dict]:
    base = {"id": f"cmpl-{request_id}", "object": "text_completion", "created": now_s(), "model": model}
    n = generations[0].n
    num_choices = len(generations) * n
    offsets = [0] * num_choices
    usages: list[ChoiceUsage | None] = [None] * num_choices
    async with contextlib.aclosing(_chain(first, events)) as chained:
        async for source, event in chained:
            index = source * n + event.index
            text = "".join(d.text for d in event.deltas if isinstance(d, TextDelta))
            usages[index] = event.usage
            if not text and event.finish_reason is None and not options.continuous_usage:
                continue
            choice = {"index": index, "text": text, "finish_reason": event.finish_reason,
                      "logprobs": completion_logprobs(event.logprobs, offsets[index]) if options.logprobs else None}
            offsets[index] += len(text)
            yield base | {"choices": [choice]} | _usage_options(options, n, usages)
    if options.include_usage:
        yield base | {"choices": [], "usage": usage_body(usages, n)}
