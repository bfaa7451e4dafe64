"""The OpenAI Responses API's wire format (`POST /v1/responses`): its request shape, input items ->
admission's chat messages, and the response object and streaming events built from choice events.

gpt-oss was trained for this API: reasoning is an output item (`reasoning`, its text in `content`,
`summary` empty as the open models return it), tool calls and their results are items, and a
conversation continues from a stored response (`previous_response_id`). The conversation renders
through harmony exactly as a chat does (`prepare_chat`): items become chat messages, nothing else.

Admission runs in the gateway's admission workers, in one or two steps:
`admit_responses_json(body)` parses and checks the request and, without `previous_response_id`, admits
it whole; with one, the gateway fetches the stored conversation and `admit_responses_turn((call,
conversation))` renders it with the new input. Items are kept in one normalized form (the output
items' shape, with ids), both as stored and as rendered, so a stored turn continues exactly as sent.
"""

from __future__ import annotations

import copy
import dataclasses
import time
import uuid
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field

from gptoss.errors import ClientError, InvalidRequestError, shorten
from gptoss.harmony import TextDelta, ToolCallArgsDelta, ToolCallStart
from serve.admission import (
    AdmissionContext,
    ChatInput,
    Generation,
    MessageInput,
    SamplingInput,
    ToolCallInput,
    ToolInput,
    check_count,
    prepare_chat,
    renamed,
)
from serve.choices import ChoiceEvent, ChoiceUsage
from serve.openai_protocol import Metadata, StrictShape, parse_body, read_body_json

UNSUPPORTED_CONTENT = ("input_image", "input_file", "input_audio", "refusal")


# --- the request ---------------------------------------------------------------------------------

class ReasoningOptions(StrictShape):
    effort: Literal["low", "medium", "high"] = "medium"
    summary: Literal["auto", "concise", "detailed"] | None = None  # accepted; summaries stay empty
    generate_summary: Literal["auto", "concise", "detailed"] | None = None


class TextFormat(StrictShape):
    type: Literal["text"]


class TextOptions(StrictShape):
    format: TextFormat | None = None
    verbosity: Literal["low", "medium", "high"] | None = None


class NamedFunctionChoice(StrictShape):
    type: Literal["function"]
    name: str


class StreamOptions(StrictShape):
    include_obfuscation: bool | None = None


class ResponsesRequest(StrictShape):
    model: str | None = None
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    reasoning: ReasoningOptions | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Literal["auto", "none", "required"] | NamedFunctionChoice | None = None
    parallel_tool_calls: bool | None = None
    max_output_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] = 1.0
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0
    top_logprobs: Annotated[int, Field(ge=0, le=0)] | None = None  # logprobs are not returned here
    stream: bool = False
    stream_options: StreamOptions | None = None
    store: bool = True
    previous_response_id: str | None = None
    metadata: Metadata | None = None
    user: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    service_tier: str | None = None
    truncation: Literal["disabled"] | None = None  # "auto" (dropping the oldest items) is not done here
    include: list[str] | None = None
    text: TextOptions | None = None
    background: Literal[False] | None = None
    max_tool_calls: None = None
    prompt: None = None
    conversation: None = None
    timeout: Annotated[float, Field(gt=0)] | None = None  # extension: seconds; the request is aborted past it


class _ContentPart(StrictShape):
    type: Literal["input_text", "output_text", "text", "reasoning_text", "summary_text"]
    text: str
    annotations: list[Any] | None = None
    logprobs: list[Any] | None = None


class _MessageItem(StrictShape):
    type: Literal["message"] = "message"
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[_ContentPart]
    phase: Literal["commentary", "final_answer"] | None = None  # an assistant message: a preamble or the answer
    id: str | None = None
    status: str | None = None


class _FunctionCallItem(StrictShape):
    # The client's own fields of a call it got from us (`model_dump()` names and wire aliases), unset here.
    model_config = ConfigDict(populate_by_name=True)

    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str
    id: str | None = None
    status: str | None = None
    namespace: None = None
    caller: None = None
    async_: None = Field(None, alias="async")


class _FunctionCallOutputItem(StrictShape):
    type: Literal["function_call_output"]
    call_id: str
    output: str | list[_ContentPart]
    id: str | None = None
    status: str | None = None
    name: str | None = None  # the call's function; the call_id decides
    namespace: None = None
    caller: None = None


class _ReasoningItem(StrictShape):
    type: Literal["reasoning"]
    summary: list[_ContentPart] = []
    content: list[_ContentPart] | None = None
    encrypted_content: None = None
    id: str | None = None
    status: str | None = None


class _FunctionTool(StrictShape):
    type: Literal["function"]
    name: str
    description: str | None = None
    parameters: dict[str, Any] | str | None = None  # a JSON schema (as JSON text from gRPC)
    strict: bool | None = None


_ITEM_SHAPES = {"message": _MessageItem, "function_call": _FunctionCallItem,
                "function_call_output": _FunctionCallOutputItem, "reasoning": _ReasoningItem}


@dataclass(frozen=True)
class ResponsesCall:
    """A checked Responses request: what admission renders and what the response object echoes."""

    response_id: str  # resp_<random>: never the client's request id, which another tenant could also send
    input_items: tuple[dict, ...]  # normalized, with ids
    chat: ChatInput  # the request with no messages yet (the conversation's items become them)
    echo: dict  # request fields the response object repeats
    previous_response_id: str | None
    stream: bool
    store: bool
    timeout_s: float | None


def admit_responses_json(body: bytes, context: AdmissionContext) -> tuple[ResponsesCall, Generation | None]:
    """`POST /v1/responses`' body -> (the checked call, its generation); the generation is None when the
    call continues a stored response (the gateway then fetches it: `admit_responses_turn`)."""
    return admit_responses_request(read_body_json(body, context), context)


def admit_responses_request(body: dict, context: AdmissionContext) -> tuple[ResponsesCall, Generation | None]:
    """A Responses request in the HTTP API's JSON shape (parsed) -> what `admit_responses_json` gives."""
    call = _call(parse_body(ResponsesRequest, body), context)
    if call.previous_response_id is not None:
        return call, None
    return call, _prepare(call, (), context)


def admit_responses_turn(call_and_conversation: tuple[ResponsesCall, tuple[dict, ...]],
                         context: AdmissionContext) -> Generation:
    """A call continuing a stored conversation (its input and output items, oldest first)."""
    call, conversation = call_and_conversation
    return _prepare(call, conversation, context)


def _call(request: ResponsesRequest, context: AdmissionContext) -> ResponsesCall:
    if request.include:  # nothing it names is produced here
        name = request.include[0]
        why = ("we keep no key to encrypt reasoning with; send reasoning items back as they came (their text "
               "is in their content)" if name == "reasoning.encrypted_content" else "it is not supported here")
        raise InvalidRequestError("include.0", f"include.0 {shorten(name)} cannot be honoured: {why}")
    limits = context.limits  # counts first: nothing is built in their size before
    if isinstance(request.input, list):
        check_count("input", len(request.input), 0, limits.max_messages, "gateway.max_messages")
    check_count("tools", len(request.tools or ()), 0, limits.max_tools, "gateway.max_tools")
    items = ([_message_item("user", request.input, "input_text")] if isinstance(request.input, str)
             else [_input_item(item, i) for i, item in enumerate(request.input)])
    tools = tuple(_tool(tool, i) for i, tool in enumerate(request.tools or ()))
    named = isinstance(request.tool_choice, NamedFunctionChoice)
    effort = request.reasoning.effort if request.reasoning else "medium"
    chat = ChatInput(request.model, (), SamplingInput(max_tokens=request.max_output_tokens,
                                                      temperature=request.temperature, top_p=request.top_p),
                     tools, tool_choice=None if named else request.tool_choice,
                     tool_choice_function=request.tool_choice.name if named else None, reasoning_effort=effort)
    if request.instructions:
        chat = dataclasses.replace(chat, messages=(MessageInput("developer", request.instructions),))
    echo = {"instructions": request.instructions, "max_output_tokens": request.max_output_tokens,
            "metadata": request.metadata or {}, "parallel_tool_calls": request.parallel_tool_calls is not False,
            "previous_response_id": request.previous_response_id,
            "reasoning": {"effort": effort, "summary": None}, "store": request.store,
            "temperature": request.temperature, "text": {"format": {"type": "text"}},
            "tool_choice": request.tool_choice.model_dump() if named else request.tool_choice or "auto",
            "tools": [dict(tool, strict=tool.get("strict", False)) for tool in request.tools or ()],
            "top_p": request.top_p, "truncation": "disabled", "user": request.user}
    return ResponsesCall(_new_item_id("resp"), tuple(items), chat, echo, request.previous_response_id,
                         request.stream, request.store, request.timeout)


def _prepare(call: ResponsesCall, conversation: tuple[dict, ...], context: AdmissionContext) -> Generation:
    """The conversation so far plus the call's input, rendered and checked as a chat."""
    items = (*conversation, *call.input_items)
    messages, origin = items_to_messages(items, len(conversation))
    chat = dataclasses.replace(call.chat, messages=call.chat.messages + messages)
    offset = len(call.chat.messages)

    def rename(param: str) -> str:  # messages.K -> the input item it came from
        head, _, rest = param.partition(".")
        if head != "messages" or not rest.split(".")[0].isdigit():
            if head == "tools" and ".function." in param:  # tools are flat here: tools.0.parameters
                return param.replace(".function.", ".", 1)
            return {"messages": "input", "max_tokens": "max_output_tokens"}.get(param, param)
        k, _, tail = rest.partition(".")
        where = origin[int(k) - offset] if int(k) >= offset else "instructions"
        return ".".join(p for p in (where, tail) if p)

    try:
        return prepare_chat(chat, context)
    except ClientError as e:
        raise renamed(e, rename) from None


# --- input items -----------------------------------------------------------------------------------

def _input_item(raw: dict, i: int) -> dict:
    """One input item, checked, in the normalized form (the output items' shape, with an id)."""
    kind = raw.get("type", "message" if "role" in raw else None)
    shape = _ITEM_SHAPES.get(kind)
    if shape is None:
        raise InvalidRequestError(f"input.{i}.type", f"input.{i}.type must be one of {', '.join(_ITEM_SHAPES)}, "
                                                     f"got {shorten(kind)}")
    for j, part in enumerate(raw.get("content") or () if isinstance(raw.get("content"), list) else ()):
        if isinstance(part, dict) and part.get("type") in UNSUPPORTED_CONTENT:
            raise InvalidRequestError(f"input.{i}.content.{j}.type", f"input.{i}.content.{j}.type "
                                      f"{part['type']!r} is not supported: gpt-oss reads text only")
    if kind == "reasoning" and raw.get("encrypted_content") is not None:
        raise InvalidRequestError(f"input.{i}.encrypted_content", f"input.{i}.encrypted_content cannot be read: "
                                  f"this server encrypts nothing; send the reasoning text in content")
    item = _parse_under(shape, raw, f"input.{i}")
    if isinstance(item, _MessageItem):
        text = item.content if isinstance(item.content, str) else "".join(p.text for p in item.content)
        if item.role != "assistant":
            return _message_item(item.role, text, "input_text", item.id)
        return _message_item(item.role, text, "output_text", item.id, item.phase or "final_answer")
    if isinstance(item, _FunctionCallItem):
        return function_call_item(item.call_id, item.name, item.arguments, item.id)
    if isinstance(item, _FunctionCallOutputItem):
        output = item.output if isinstance(item.output, str) else "".join(p.text for p in item.output)
        return {"id": item.id or _new_item_id("fco"), "type": "function_call_output", "call_id": item.call_id,
                "output": output, "status": "completed"}
    text = "".join(p.text for p in item.content or item.summary)
    return reasoning_item(text, item.id)


def _message_item(role: str, text: str, part_type: str, item_id: str | None = None, phase: str | None = None
                  ) -> dict:
    """A message item; an assistant's has `phase`: "commentary" (a preamble, harmony's commentary channel)
    or "final_answer"."""
    part = {"type": part_type, "text": text} | ({"annotations": [], "logprobs": []} if part_type == "output_text" else {})
    return {"id": item_id or _new_item_id("msg"), "type": "message", "role": role, "content": [part],
            "status": "completed"} | ({"phase": phase} if phase else {})


def function_call_item(call_id: str, name: str, arguments: str, item_id: str | None = None,
                       status: str = "completed") -> dict:
    return {"id": item_id or _new_item_id("fc"), "type": "function_call", "call_id": call_id, "name": name,
            "arguments": arguments, "status": status}


def reasoning_item(text: str, item_id: str | None = None, status: str = "completed") -> dict:
    return {"id": item_id or _new_item_id("rs"), "type": "reasoning", "summary": [],
            "content": [{"type": "reasoning_text", "text": text}], "encrypted_content": None, "status": status}


def _tool(raw: dict, i: int) -> ToolInput:
    if raw.get("type") != "function":
        raise InvalidRequestError(f"tools.{i}.type", f"tools.{i}.type {shorten(raw.get('type'))} is not supported: "
                                                     f"this server runs no built-in tools; declare function tools")
    tool = _parse_under(_FunctionTool, raw, f"tools.{i}")
    return ToolInput(tool.name, tool.description or "", tool.parameters)


def _parse_under(shape, raw: dict, prefix: str):
    """`parse_body` of one element of a list field, its errors naming the field under `prefix`
    (`input.3.role`; the element itself where the whole body was wrong)."""
    try:
        return parse_body(shape, raw)
    except InvalidRequestError as e:
        raise renamed(e, lambda param: prefix if param == "body" else f"{prefix}.{param}") from None


def items_to_messages(items: tuple[dict, ...], num_stored: int = 0) -> tuple[tuple[MessageInput, ...], list[str]]:
    """Normalized items -> (chat messages, for each message the item that made it: `input.K`, or
    `previous_response_id` for a stored one). An assistant turn's consecutive reasoning, text and
    function calls become one assistant message, in harmony's order (analysis, preamble, calls)."""
    messages: list[MessageInput] = []
    origin: list[str] = []
    turn: dict | None = None  # the assistant message being gathered
    call_names: dict[str, str] = {}

    def where(i: int) -> str:
        return "previous_response_id" if i < num_stored else f"input.{i - num_stored}"

    def close_turn() -> None:
        nonlocal turn
        if turn is not None:
            messages.append(MessageInput("assistant", "".join(turn["text"]), tool_calls=tuple(turn["calls"]),
                                         reasoning="".join(turn["reasoning"]) or None, channel=turn.get("channel")))
            origin.append(turn["origin"])
            turn = None

    def assistant(i: int, stage: int) -> dict:
        """The open assistant turn, or a new one when this part would come before what it holds (or is a
        second reasoning or text part: separate harmony messages)."""
        nonlocal turn
        if turn is None or turn["stage"] > stage or turn["stage"] == stage < 2:
            close_turn()
            turn = {"stage": stage, "reasoning": [], "text": [], "calls": [], "origin": where(i)}
        turn["stage"] = max(turn["stage"], stage)
        return turn

    for i, item in enumerate(items):
        kind = item["type"]
        if kind == "reasoning":
            assistant(i, 0)["reasoning"].append(item["content"][0]["text"] if item["content"] else "")
        elif kind == "message" and item["role"] == "assistant":
            turn_ = assistant(i, 1)
            turn_["text"].append("".join(p["text"] for p in item["content"]))
            turn_["channel"] = "commentary" if item.get("phase") == "commentary" else None
        elif kind == "function_call":
            call_names[item["call_id"]] = item["name"]
            assistant(i, 2)["calls"].append(ToolCallInput(item["name"], item["arguments"], item["call_id"]))
        elif kind == "function_call_output":
            close_turn()
            name = call_names.get(item["call_id"])
            if name is None:
                raise InvalidRequestError(f"{where(i)}.call_id", f"{where(i)}.call_id {shorten(item['call_id'])} "
                                          f"matches no earlier function_call item")
            messages.append(MessageInput("tool", item["output"], name=name, tool_call_id=item["call_id"]))
            origin.append(where(i))
        else:
            close_turn()
            messages.append(MessageInput(item["role"], "".join(p["text"] for p in item["content"])))
            origin.append(where(i))
    close_turn()
    return tuple(messages), origin


def _new_item_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


# --- the response ----------------------------------------------------------------------------------

def usage_of(usage: ChoiceUsage | None, block_size: int) -> dict | None:
    """OpenAI's usage object. The prefix cache keeps the prompt's full KV blocks: those it did not
    already hold are the tokens written to it."""
    if usage is None:
        return None
    written = usage.num_prompt_tokens // block_size * block_size - usage.num_cached_tokens
    return {"input_tokens": usage.num_prompt_tokens,
            "input_tokens_details": {"cached_tokens": usage.num_cached_tokens, "cache_write_tokens": max(0, written)},
            "output_tokens": usage.num_output_tokens,
            "output_tokens_details": {"reasoning_tokens": usage.num_reasoning_tokens},
            "total_tokens": usage.num_prompt_tokens + usage.num_output_tokens}


class ResponseBuilder:
    """One response's output items and streaming events, built from its choice's events. The same
    builder serves a streamed response (every event) and a whole one (the final object only)."""

    def __init__(self, call: ResponsesCall, model: str, block_size: int):
        self.block_size = block_size
        self.response = {"id": call.response_id, "object": "response", "created_at": time.time(),
                         "status": "in_progress", "background": False, "error": None, "incomplete_details": None,
                         "model": model, "output": [], "usage": None} | call.echo
        self.usage: ChoiceUsage | None = None
        self.replica_id = ""  # the model server replica that served it
        self._sequence = 0
        self._open: dict | None = None  # the output item being streamed, with its channel
        self._channel: str | None = None

    # Events are OpenAI's, each with its sequence number (the order a client must see them in).
    def _event(self, kind: str, **fields) -> dict:
        event = {"type": kind, "sequence_number": self._sequence} | fields
        self._sequence += 1
        return event

    def start(self) -> list[dict]:
        return [self._event("response.created", response=self._snapshot()),
                self._event("response.in_progress", response=self._snapshot())]

    def add(self, event: ChoiceEvent) -> list[dict]:
        out: list[dict] = []
        for delta in event.deltas:
            if isinstance(delta, TextDelta):
                out += self._text(delta.channel, delta.text)
            elif isinstance(delta, ToolCallStart):
                out += self._close()
                out += self._open_item(function_call_item(delta.call_id, delta.name, "", status="in_progress"), None)
            elif isinstance(delta, ToolCallArgsDelta) and self._open is not None \
                    and self._open["type"] == "function_call":
                self._open["arguments"] += delta.arguments
                out.append(self._event("response.function_call_arguments.delta", item_id=self._open["id"],
                                       output_index=len(self.response["output"]) - 1, delta=delta.arguments))
        if event.usage is not None and (event.usage.num_output_tokens or self.usage is None):
            self.usage = event.usage  # an abort's event has no counts: the last ones stand
        self.replica_id = self.replica_id or event.replica_id
        if event.finish_reason is not None:
            out += self._finish(event.finish_reason)
        return out

    def fail(self, message: str, code: str = "server_error") -> list[dict]:
        """The events that end the response as failed (a fault after the stream started, reported
        in-band): the open item closes as incomplete, then `response.failed`. `code`: server_error or
        rate_limit_exceeded, as OpenAI's error codes go."""
        out = self._close("incomplete")
        self.response |= {"status": "failed", "error": {"code": code, "message": message},
                          "incomplete_details": None, "usage": usage_of(self.usage, self.block_size)}
        return out + [self._event("response.failed", response=self._snapshot())]

    @property
    def finished(self) -> bool:
        return self.response["status"] != "in_progress"

    @property
    def started_output(self) -> bool:
        """Whether events past `response.in_progress` were made (a fault is then reported in-band)."""
        return self._sequence > 2

    def _text(self, channel: str, text: str) -> list[dict]:
        out: list[dict] = []
        reasoning = channel == "analysis"
        if self._open is None or self._channel != channel or self._open["type"] == "function_call":
            out += self._close()
            phase = "commentary" if channel == "commentary" else "final_answer"
            item = reasoning_item("", status="in_progress") if reasoning \
                else _message_item("assistant", "", "output_text", phase=phase) | {"status": "in_progress"}
            out += self._open_item(item, channel)
        index = len(self.response["output"]) - 1
        self._open["content"][0]["text"] += text
        kind = "response.reasoning_text.delta" if reasoning else "response.output_text.delta"
        extra = {} if reasoning else {"logprobs": []}
        out.append(self._event(kind, item_id=self._open["id"], output_index=index, content_index=0, delta=text,
                               **extra))
        return out

    def _open_item(self, item: dict, channel: str | None) -> list[dict]:
        self._open, self._channel = item, channel
        self.response["output"].append(item)
        index = len(self.response["output"]) - 1
        shown = item if item["type"] == "function_call" else dict(item, content=[])
        out = [self._event("response.output_item.added", output_index=index, item=copy.deepcopy(shown))]
        if item["type"] != "function_call":
            out.append(self._event("response.content_part.added", item_id=item["id"], output_index=index,
                                   content_index=0, part=dict(item["content"][0], text="")))
        return out

    def _close(self, status: str = "completed") -> list[dict]:
        item, self._open, self._channel = self._open, None, None
        if item is None:
            return []
        item["status"] = status
        index = len(self.response["output"]) - 1
        if item["type"] == "function_call":
            out = [self._event("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                               name=item["name"], arguments=item["arguments"])]
        else:
            part = item["content"][0]
            done = "response.reasoning_text.done" if item["type"] == "reasoning" else "response.output_text.done"
            extra = {"logprobs": []} if item["type"] == "message" else {}
            out = [self._event(done, item_id=item["id"], output_index=index, content_index=0, text=part["text"],
                               **extra),
                   self._event("response.content_part.done", item_id=item["id"], output_index=index,
                               content_index=0, part=dict(part))]
        out.append(self._event("response.output_item.done", output_index=index, item=copy.deepcopy(item)))
        return out

    def _finish(self, finish_reason: str) -> list[dict]:
        if finish_reason == "abort":  # the model server ended it early (it was going away)
            return self.fail("the model server ended the response early; send it again")
        truncated = finish_reason == "length"
        out = self._close("incomplete" if truncated else "completed")
        self.response["usage"] = usage_of(self.usage, self.block_size)
        if truncated:
            self.response |= {"status": "incomplete", "incomplete_details": {"reason": "max_output_tokens"}}
            return out + [self._event("response.incomplete", response=self._snapshot())]
        self.response["status"] = "completed"
        return out + [self._event("response.completed", response=self._snapshot())]

    def _snapshot(self) -> dict:
        return copy.deepcopy(self.response)  # an event carries what it was then, not what it becomes


def failure_code(http_status: int) -> str:
    """A failed response's `error.code` for a fault of that HTTP status, among OpenAI's codes."""
    return "rate_limit_exceeded" if http_status == 429 else "server_error"


def stored_record(call: ResponsesCall, response: dict, conversation: tuple[dict, ...], tenant: str) -> dict:
    """What the store keeps of a finished response: the object, its own input items, and the whole
    conversation a `previous_response_id` continues (earlier items, this input, this output)."""
    return {"tenant": tenant, "response": response, "input_items": list(call.input_items),
            "conversation": [*conversation, *call.input_items, *response["output"]]}
