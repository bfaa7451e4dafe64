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
from serve.responses_protocol import ResponsesCall, admit_responses_request, admit_responses_turn

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


# --- the Responses API -------------------------------------------------------------------------------

def admit_respond(raw: bytes, context: AdmissionContext) -> tuple[ResponsesCall, Generation | None]:
    """A `RespondRequest`'s bytes -> what `admit_responses_json` gives for HTTP: the request becomes the
    Responses API's JSON shape and goes through the same checks and rendering."""
    request = parse_message(raw, pb.RespondRequest, context.limits.max_request_bytes)
    body: dict = {"model": request.model or None, "input": [_input_item(item) for item in request.input],
                  "instructions": request.instructions or None,
                  "reasoning": {"effort": request.reasoning_effort or "medium"},
                  "tools": [{"type": "function", "name": t.name, "description": t.description,
                             "parameters": t.parameters_json or None} for t in request.tools] or None,
                  "previous_response_id": request.previous_response_id or None,
                  "metadata": dict(request.metadata) or None, "user": request.user or None}
    if request.tool_choice:
        named = request.tool_choice not in ("auto", "none", "required")
        body["tool_choice"] = {"type": "function", "name": request.tool_choice} if named else request.tool_choice
    for name in ("max_output_tokens", "temperature", "top_p", "store"):
        if request.HasField(name):
            body[name] = getattr(request, name)
    try:
        return admit_responses_request(body, context)
    except ClientError as e:
        raise renamed(e, _respond_field) from None


def admit_respond_turn(call_and_conversation: tuple[ResponsesCall, tuple[dict, ...]],
                       context: AdmissionContext) -> Generation:
    """`admit_responses_turn`, its errors naming RespondRequest's fields."""
    try:
        return admit_responses_turn(call_and_conversation, context)
    except ClientError as e:
        raise renamed(e, _respond_field) from None


def _input_item(item: pb.Item) -> dict:
    kind = item.WhichOneof("kind")
    if kind == "message":
        return {"type": "message", "role": item.message.role, "content": item.message.text}
    if kind == "function_call":
        c = item.function_call
        return {"type": "function_call", "call_id": c.call_id, "name": c.name, "arguments": c.arguments}
    if kind == "function_call_output":
        return {"type": "function_call_output", "call_id": item.function_call_output.call_id,
                "output": item.function_call_output.output}
    if kind == "reasoning":
        return {"type": "reasoning", "content": [{"type": "reasoning_text", "text": item.reasoning.text}]}
    return {"type": None}  # refused by admission, naming the item


def _respond_field(param: str) -> str:
    """A Responses admission error's field as RespondRequest spells it (input[2].call_id, tools[0].parameters_json)."""
    if param.startswith("reasoning"):
        return "reasoning_effort"
    return re.sub(r"\.(\d+)", r"[\1]", param).replace(".parameters", ".parameters_json")


def item_message(item: dict) -> pb.Item:
    """A normalized item (serve/responses_protocol.py) as a `gptoss.v1.Item`."""
    message = pb.Item(id=item["id"], status=item.get("status", ""))
    kind = item["type"]
    if kind == "message":
        message.message.CopyFrom(pb.MessageItem(role=item["role"], text="".join(p["text"] for p in item["content"])))
    elif kind == "function_call":
        message.function_call.CopyFrom(pb.FunctionCallItem(call_id=item["call_id"], name=item["name"],
                                                           arguments=item["arguments"]))
    elif kind == "function_call_output":
        message.function_call_output.CopyFrom(pb.FunctionCallOutputItem(call_id=item["call_id"],
                                                                        output=item["output"]))
    elif kind == "reasoning":
        message.reasoning.CopyFrom(pb.ReasoningItem(text="".join(p["text"] for p in item["content"])))
    return message


def response_message(response: dict, input_items: list[dict] | None = None) -> pb.Response:
    """A response object (the HTTP API's JSON) as a `gptoss.v1.Response`."""
    message = pb.Response(id=response["id"], status=response["status"], model=response["model"],
                          previous_response_id=response.get("previous_response_id") or "",
                          created_at=response["created_at"], metadata=response.get("metadata") or {},
                          output=[item_message(item) for item in response["output"]],
                          input_items=[item_message(item) for item in input_items or ()])
    if response.get("incomplete_details"):
        message.incomplete_reason = response["incomplete_details"]["reason"]
    if response.get("error"):
        message.error_message = response["error"]["message"]
    usage = response.get("usage")
    if usage:
        message.usage.CopyFrom(pb.ResponseUsage(
            input_tokens=usage["input_tokens"], cached_tokens=usage["input_tokens_details"]["cached_tokens"],
            output_tokens=usage["output_tokens"], reasoning_tokens=usage["output_tokens_details"]["reasoning_tokens"],
            total_tokens=usage["total_tokens"]))
    return message


def response_event_message(event: dict) -> pb.ResponseEvent:
    """One of OpenAI's streaming events (a dict) as a `gptoss.v1.ResponseEvent`."""
    message = pb.ResponseEvent(type=event["type"], sequence_number=event["sequence_number"],
                               output_index=event.get("output_index", 0), item_id=event.get("item_id", ""),
                               delta=event.get("delta", ""), text=event.get("text", event.get("arguments", "")))
    if "item" in event:
        message.item.CopyFrom(item_message(event["item"]))
    if "response" in event:
        message.response.CopyFrom(response_message(event["response"]))
    return message
