"""The gRPC service `gptoss.v1.GptossService` (and `grpc.health.v1.Health/Check`) over the gateway's
pipeline. Ray Serve's gRPC proxy calls the ingress method named like the RPC; a failure sets the status
code and details on the call's context and raises, which the proxy sends as that status."""

from __future__ import annotations

import dataclasses
import json
import uuid
from collections.abc import AsyncIterator

import grpc
from grpc_health.v1 import health_pb2

from engine.sampling_params import SamplingParams
from gptoss.errors import InvalidRequestError, NotFoundError
from gptoss.harmony import ChatMessage, FunctionTool, TextDelta, ToolCall, ToolCallArgsDelta, ToolCallStart
from gptoss.tokenizer import encode
from serve.errors import error_reply
from serve.gateway import ChoiceEvent, Generation, Pipeline, ToolChoice, render_chat
from serve.proto.gptoss.v1 import gptoss_pb2 as pb

SERVICE_NAME = "gptoss.v1.GptossService"
REPLICA_METADATA = "x-gptoss-replica"  # trailing metadata: the model server replica that served the call
MAX_REQUEST_ID_CHARS = 256

_CHANNELS = {"final": pb.CHANNEL_FINAL, "analysis": pb.CHANNEL_ANALYSIS, "commentary": pb.CHANNEL_COMMENTARY}
_FINISH_REASONS = {None: pb.FINISH_REASON_UNSPECIFIED, "stop": pb.FINISH_REASON_STOP,
                   "length": pb.FINISH_REASON_LENGTH, "tool_calls": pb.FINISH_REASON_TOOL_CALLS,
                   "abort": pb.FINISH_REASON_ABORT}


class GrpcApi:
    """Mixed into the gateway deployment, which sets `pipeline`."""

    pipeline: Pipeline

    async def Generate(self, request: pb.GenerateRequest, grpc_context) -> AsyncIterator[pb.GenerateResponse]:  # noqa: N802
        self.pipeline.metrics.request("grpc")
        try:
            tenant = self.pipeline.authenticate(metadata_token(grpc_context))
            self.pipeline.check_model(request.model)
            generation = dataclasses.replace(generation_from_proto(request), cache_salt=tenant)
            replica_sent = False
            async for event in self.pipeline.run(generation):
                if not replica_sent and event.replica_id:
                    grpc_context.set_trailing_metadata([(REPLICA_METADATA, event.replica_id)])
                    replica_sent = True
                for message in responses(event, generation.request_id):
                    yield message
        except Exception as e:
            fail(grpc_context, e, self.pipeline)

    async def Abort(self, request: pb.AbortRequest, grpc_context) -> pb.AbortResponse:  # noqa: N802
        try:
            self.pipeline.authenticate(metadata_token(grpc_context))
            return pb.AbortResponse(aborted=self.pipeline.abort(request.request_id))
        except Exception as e:
            fail(grpc_context, e, self.pipeline)

    async def GetModelInfo(self, request: pb.GetModelInfoRequest, grpc_context) -> pb.ModelInfo:  # noqa: N802
        try:
            self.pipeline.authenticate(metadata_token(grpc_context))
            self.pipeline.check_model(request.model)
            info = await self.pipeline.info()
            return pb.ModelInfo(model=self.pipeline.model_name, max_model_len=info.max_model_len,
                                vocab_size=info.vocab_size, num_hidden_layers=info.num_hidden_layers,
                                num_local_experts=info.num_local_experts,
                                num_experts_per_tok=info.num_experts_per_tok, num_ranks_per_group=info.num_ranks,
                                dtype=info.dtype, device=info.device, max_logprobs=info.max_logprobs)
        except Exception as e:
            fail(grpc_context, e, self.pipeline)

    async def Check(self, request: health_pb2.HealthCheckRequest, grpc_context) -> health_pb2.HealthCheckResponse:  # noqa: N802
        """grpc.health.v1: SERVING when a model server replica has a healthy EP group."""
        try:
            self.pipeline.authenticate_health(metadata_token(grpc_context))
        except Exception as e:
            fail(grpc_context, e, self.pipeline)
        if request.service not in ("", SERVICE_NAME):
            fail(grpc_context, NotFoundError(f"unknown service {request.service!r}; this server has {SERVICE_NAME!r}",
                                             "service"))
        healthy = await self.pipeline.healthy()
        status = health_pb2.HealthCheckResponse.SERVING if healthy else health_pb2.HealthCheckResponse.NOT_SERVING
        return health_pb2.HealthCheckResponse(status=status)


def fail(grpc_context, exc: Exception, pipeline: Pipeline | None = None):
    """Sends `exc` as the call's status (the proxy needs the code set, then an exception)."""
    reply = error_reply(exc)
    if pipeline is not None:
        pipeline.metrics.error("grpc", reply.http_status)
    grpc_context.set_code(grpc.StatusCode[reply.grpc_code])
    grpc_context.set_details(reply.message)
    raise exc


def metadata_token(grpc_context) -> str | None:
    for key, value in grpc_context.invocation_metadata():
        if key == "authorization":
            scheme, _, token = value.partition(" ")
            return token.strip() if scheme.lower() == "bearer" and token.strip() else None
    return None


# --- requests --------------------------------------------------------------------------------------

def generation_from_proto(request: pb.GenerateRequest) -> Generation:
    request_id = request.request_id or f"grpc-{uuid.uuid4().hex}"
    if len(request_id) > MAX_REQUEST_ID_CHARS or not request_id.isprintable():
        raise InvalidRequestError("request_id", f"request_id must be at most {MAX_REQUEST_ID_CHARS} printable "
                                                f"characters, got {request_id[:50]!r}")
    s = request.sampling
    n = s.n if s.HasField("n") else 1
    if n < 1:
        raise InvalidRequestError("sampling.n", f"sampling.n must be >= 1, got {n}")
    stop = tuple(s.stop)
    kind = request.WhichOneof("input")
    if kind is None:
        raise InvalidRequestError("input", "input must be set: one of token_ids, text, chat")
    prefill: tuple[int, ...] = ()
    include_reasoning = True
    if kind == "chat":
        prompt, prefill = chat_prompt(request.chat)
        include_reasoning = not request.chat.HasField("include_reasoning") or request.chat.include_reasoning
    elif kind == "text":
        prompt = tuple(encode(request.text))
    else:
        prompt = tuple(request.token_ids.ids)
    if not prompt:
        raise InvalidRequestError(kind, f"{kind} must not be empty")
    return Generation(request_id, prompt, sampling_from_proto(s), n, stop, harmony=kind == "chat",
                      prefill_token_ids=prefill, include_reasoning=include_reasoning)


def sampling_from_proto(s: pb.SamplingParams) -> SamplingParams:
    """Only the fields the client set; the rest keep SamplingParams' defaults."""
    fields = {name: getattr(s, name) for name in ("max_tokens", "temperature", "top_p", "top_k", "min_p",
                                                  "presence_penalty", "frequency_penalty", "seed", "logprobs")
              if s.HasField(name)}
    if "max_tokens" in fields and fields["max_tokens"] == 0:
        raise InvalidRequestError("sampling.max_tokens", "sampling.max_tokens must be >= 1, got 0")
    if "seed" in fields and fields["seed"] >= 2**63:
        raise InvalidRequestError("sampling.seed", f"sampling.seed must be < 2**63, got {fields['seed']}")
    try:
        return SamplingParams(**fields)
    except InvalidRequestError as e:
        raise InvalidRequestError(f"sampling.{e.param}", f"sampling.{e}") from None


def chat_prompt(chat: pb.Chat) -> tuple[tuple[int, ...], tuple[int, ...]]:
    messages = []
    for i, m in enumerate(chat.messages):
        try:
            calls = tuple(ToolCall(c.name, c.arguments, c.id or None) for c in m.tool_calls)
            messages.append(ChatMessage(m.role, m.content, name=m.name or None, tool_calls=calls,
                                        tool_call_id=m.tool_call_id or None, reasoning=m.reasoning or None))
        except ValueError as e:
            raise InvalidRequestError(f"chat.messages[{i}]", f"chat.messages[{i}]: {e}") from None
    if not messages:
        raise InvalidRequestError("chat.messages", "chat.messages must not be empty")
    tools = []
    for i, t in enumerate(chat.tools):
        try:
            parameters = json.loads(t.parameters_json) if t.parameters_json else None
        except json.JSONDecodeError as e:
            raise InvalidRequestError(f"chat.tools[{i}].parameters_json",
                                      f"chat.tools[{i}].parameters_json must be JSON: {e}") from None
        if parameters is not None and not isinstance(parameters, dict):
            raise InvalidRequestError(f"chat.tools[{i}].parameters_json",
                                      f"chat.tools[{i}].parameters_json must be a JSON object (a schema)")
        try:
            tools.append(FunctionTool(t.name, t.description, parameters))
        except ValueError as e:
            raise InvalidRequestError(f"chat.tools[{i}].name", f"chat.tools[{i}].{e}") from None
    choice = chat.tool_choice or ("auto" if tools else "none")
    tool_choice = ToolChoice(choice) if choice in ("auto", "none", "required") else ToolChoice("function", choice)
    effort = chat.reasoning_effort or "medium"
    if effort not in ("low", "medium", "high"):
        raise InvalidRequestError("chat.reasoning_effort", f"chat.reasoning_effort must be low, medium or high, "
                                                           f"got {effort!r}")
    try:
        return render_chat(messages, tools, tool_choice, effort)
    except InvalidRequestError as e:  # name the field as the proto spells it
        raise InvalidRequestError(f"chat.{e.param}", f"chat.{e}") from None


# --- responses -------------------------------------------------------------------------------------

def responses(event: ChoiceEvent, request_id: str) -> list[pb.GenerateResponse]:
    """One message per text segment of one channel (the first also carries the token ids, logprobs and
    tool-call deltas; the last the finish reason and usage)."""
    calls: list[pb.ToolCallDelta] = []
    texts: list[tuple[int, str]] = []
    for d in event.deltas:
        if isinstance(d, ToolCallStart):
            calls.append(pb.ToolCallDelta(index=d.index, id=f"call_{uuid.uuid4().hex[:24]}", name=d.name))
        elif isinstance(d, ToolCallArgsDelta):
            calls.append(pb.ToolCallDelta(index=d.index, arguments=d.arguments))
        elif isinstance(d, TextDelta):
            texts.append((_CHANNELS[d.channel], d.text))
    messages = [pb.GenerateResponse(request_id=request_id, index=event.index, channel=channel, text=text)
                for channel, text in texts] or [pb.GenerateResponse(request_id=request_id, index=event.index)]
    first, last = messages[0], messages[-1]
    first.token_ids.extend(event.token_ids)
    first.tool_calls.extend(calls)
    first.logprobs.extend(pb.TokenLogprob(token_id=lp.token_id, logprob=lp.logprob, top_token_ids=lp.top_token_ids,
                                          top_logprobs=lp.top_logprobs) for lp in event.logprobs)
    last.finish_reason = _FINISH_REASONS[event.finish_reason]
    if event.finish_reason is not None and event.usage is not None:
        u = event.usage
        last.usage.CopyFrom(pb.Usage(prompt_tokens=u.num_prompt_tokens, completion_tokens=u.num_output_tokens,
                                     cached_tokens=u.num_cached_tokens, reasoning_tokens=u.num_reasoning_tokens))
    return messages
