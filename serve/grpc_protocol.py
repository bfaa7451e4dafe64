"""The gRPC API's wire format: `gptoss.v1` messages -> admission inputs, and choice events ->
`GenerateResponse` messages. Neither Ray nor a gRPC server here: the gateway runs `admit_generate` in
its admission workers.

Requests arrive as raw bytes (serve/grpc_registration.py registers the service that way): their size is
checked before they are parsed, and a malformed message is INVALID_ARGUMENT, not the UNKNOWN that
protobuf's exception would become inside Serve's proxy. Errors name the proto's fields
(`sampling.n`, `chat.messages[2].content`, `chat.tools[0].parameters_json`).
"""

from __future__ import annotations

import dataclasses
import re

from google.protobuf.message import DecodeError, Message

from engine.sampling_params import DEFAULT_STOP_TOKEN_IDS
from gptoss.errors import ClientError, InvalidRequestError, PayloadTooLargeError, shorten
from gptoss.harmony import TextDelta, ToolCallArgsDelta, ToolCallStart
from serve.admission import (
    AdmissionContext,
    ChatInput,
    CompletionInput,
    Generation,
    MessageInput,
    SamplingInput,
    ToolCallInput,
    ToolInput,
    prepare_chat,
    prepare_completion,
    renamed,
)
from serve.choices import ChoiceEvent
from serve.proto.gptoss.v1 import gptoss_pb2 as pb

MAX_REQUEST_ID_CHARS = 256
SAMPLING_FIELDS = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
                   "seed", "logprobs", "n", "stop")
_CHANNELS = {"final": pb.CHANNEL_FINAL, "analysis": pb.CHANNEL_ANALYSIS, "commentary": pb.CHANNEL_COMMENTARY}
_FINISH_REASONS = {None: pb.FINISH_REASON_UNSPECIFIED, "stop": pb.FINISH_REASON_STOP,
                   "length": pb.FINISH_REASON_LENGTH, "tool_calls": pb.FINISH_REASON_TOOL_CALLS,
                   "abort": pb.FINISH_REASON_ABORT}


def parse_message(raw: bytes, message_type: type[Message], max_bytes: int) -> Message:
    """A request message from its bytes, refused by size before it is parsed.

    Raises:
        PayloadTooLargeError, InvalidRequestError (not a valid message of that type).
    """
    name = message_type.DESCRIPTOR.full_name
    if len(raw) > max_bytes:
        raise PayloadTooLargeError(f"the {name} message has {len(raw)} bytes; at most {max_bytes} are accepted "
                                   f"(gateway.max_request_bytes)")
    try:
        return message_type.FromString(raw)
    except DecodeError:
        raise InvalidRequestError("request", f"the request is not a valid {name} message (malformed protobuf "
                                             f"encoding)") from None


def admit_generate(raw: bytes, context: AdmissionContext) -> Generation:
    """A `GenerateRequest`'s bytes -> the generation to run (an admission worker's job)."""
    request = parse_message(raw, pb.GenerateRequest, context.limits.max_request_bytes)
    kind = request.WhichOneof("input")
    try:
        request_id = request.request_id or context.request_id
        if len(request_id) > MAX_REQUEST_ID_CHARS or not request_id.isprintable():
            raise InvalidRequestError("request_id", f"request_id must be at most {MAX_REQUEST_ID_CHARS} printable "
                                                    f"characters, got {shorten(request_id)}")
        context = dataclasses.replace(context, request_id=request_id)
        sampling = sampling_input(request.sampling)
        if kind == "chat":
            return prepare_chat(chat_input(request, sampling), context)
        if kind is None:
            raise InvalidRequestError("input", "input must be set: one of token_ids, text, chat")
        prompt = request.text if kind == "text" else tuple(request.token_ids.ids)
        [generation] = prepare_completion(CompletionInput(request.model or None, (prompt,), sampling), context,
                                          stop_token_ids=DEFAULT_STOP_TOKEN_IDS)
        return generation
    except ClientError as e:
        raise renamed(e, lambda param: proto_field(param, kind or "input")) from None


def sampling_input(s: pb.SamplingParams) -> SamplingInput:
    """The fields the client set; the others keep their defaults."""
    fields = {name: getattr(s, name) for name in SAMPLING_FIELDS[:-1] if s.HasField(name)}
    return SamplingInput(stop=tuple(s.stop), **fields)


def chat_input(request: pb.GenerateRequest, sampling: SamplingInput) -> ChatInput:
    chat = request.chat
    messages = tuple(MessageInput(m.role, m.content, m.name or None,
                                  tuple(ToolCallInput(c.name, c.arguments, c.id or None) for c in m.tool_calls),
                                  m.tool_call_id or None, m.reasoning or None) for m in chat.messages)
    tools = tuple(ToolInput(t.name, t.description, t.parameters_json or None) for t in chat.tools)
    named = chat.tool_choice not in ("", "auto", "none", "required")
    return ChatInput(request.model or None, messages, sampling, tools,
                     tool_choice=None if named else chat.tool_choice or None,
                     tool_choice_function=chat.tool_choice if named else None,
                     reasoning_effort=chat.reasoning_effort or "medium",
                     include_reasoning=not chat.HasField("include_reasoning") or chat.include_reasoning)


def proto_field(param: str, input_kind: str) -> str:
    """An admission error's field (OpenAI's spelling) as the proto spells it."""
    head = param.split(".", 1)[0]
    if head in ("top_logprobs", "logprobs"):
        return "sampling.logprobs"
    if head in SAMPLING_FIELDS:
        return f"sampling.{param}"
    if head == "prompt":
        return input_kind
    if head in ("messages", "tools", "tool_choice", "reasoning_effort"):
        path = re.sub(r"\.(\d+)", r"[\1]", param).replace(".function", "").replace(".parameters", ".parameters_json")
        return f"chat.{path}"
    return param


# --- responses ---------------------------------------------------------------------------------------

def responses(event: ChoiceEvent, request_id: str) -> list[pb.GenerateResponse]:
    """One message per text segment of one channel (the first also carries the token ids, logprobs and
    tool-call deltas; the last the finish reason and usage)."""
    calls: list[pb.ToolCallDelta] = []
    texts: list[tuple[int, str]] = []
    for d in event.deltas:
        if isinstance(d, ToolCallStart):
            calls.append(pb.ToolCallDelta(index=d.index, id=d.call_id, name=d.name))
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
