"""Admission: the one path from any API's request to the generations the gateway runs.

An API module (OpenAI HTTP, gRPC, batch rows) only translates its wire format into a `ChatInput` or a
`CompletionInput` of plain values; `prepare_chat` / `prepare_completion` apply every rule and limit,
in this order, for every API alike:

1. the model, then counts and sizes (choices, logprobs, stop strings, prompts, messages, tools and
   their schemas), before anything is built in their size;
2. conversion (messages, tools, tool_choice, sampling) and harmony rendering;
3. the prompt against the limits and the model (context length, vocabulary) and the output budget.

Errors name the field as the OpenAI API spells it (`messages.3`, `tools.0.function.parameters`,
`top_logprobs`); the gRPC layer renames them to its proto fields. Nothing here imports Ray, torch or a
web framework: the gateway runs it in admission worker processes (serve/admission_workers.py), so that
no request, however large or hostile, holds its event loop, and batch jobs run it in their render tasks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass

from openai_harmony import HarmonyError

from engine.sampling_params import SamplingParams
from gptoss.errors import ClientError, InvalidRequestError, NotFoundError, shorten
from gptoss.harmony import (
    ChatMessage,
    ChatMessageError,
    FunctionTool,
    ToolCall,
    render_prompt,
    tool_call_prefill,
)
from gptoss.tokenizer import encode

REASONING_EFFORTS = ("low", "medium", "high")
TOOL_CHOICES = ("auto", "none", "required")


class ContextLengthError(ClientError):
    """Prompt (+ max_tokens) longer than the model's context: OpenAI's `context_length_exceeded`."""


@dataclass(frozen=True)
class RequestLimits:
    """Bounds every API applies (the app config's `gateway` and `engine.max_logprobs`)."""

    max_request_bytes: int = 8 << 20  # a whole HTTP body or gRPC message
    max_n: int = 8  # choices per request
    max_logprobs: int = 20  # top logprobs per token
    max_stop_strings: int = 16
    max_stop_chars: int = 256  # characters of one stop string
    max_prompts: int = 128  # prompts of one completions request
    max_messages: int = 2048
    max_tools: int = 128
    max_tool_schema_bytes: int = 64 << 10  # one tool's parameters schema, as JSON
    max_json_depth: int = 64  # nesting of a request body and of a tool's schema
    max_prompt_tokens: int | None = None  # None: what the model's context allows
    max_output_tokens: int | None = None  # None: what the context leaves


@dataclass(frozen=True)
class ModelLimits:
    """What a prompt is checked against: the served model's figures (from a model server replica)."""

    max_model_len: int
    vocab_size: int


@dataclass(frozen=True)
class AdmissionContext:
    """Everything admitting one request needs besides the request itself (plain values: it crosses to
    an admission worker process)."""

    limits: RequestLimits
    model_name: str | None  # the served model; a request naming another gets a 404 (None: not checked)
    request_id: str  # the gateway's id of the request (gRPC: unless the request names its own)
    tenant: str = ""  # from the API key: the request's prefix-cache namespace
    model: ModelLimits | None = None  # None: the engine checks the prompt against the model (batch rows)
    current_date: str | None = None  # the conversation date harmony renders (the gateway's today)


# --- what the API layers hand over ---------------------------------------------------------------------

@dataclass(frozen=True)
class SamplingInput:
    """Sampling fields as sent; the defaults are SamplingParams' (a field not sent keeps its default)."""

    n: int = 1
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    logprobs: int | None = None  # top logprobs per token; None: no logprobs at all
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class ToolCallInput:
    name: str
    arguments: str
    id: str | None = None


@dataclass(frozen=True)
class MessageInput:
    role: str
    content: str = ""
    name: str | None = None  # a tool message's function
    tool_calls: tuple[ToolCallInput, ...] = ()
    tool_call_id: str | None = None
    reasoning: str | None = None  # an earlier assistant turn's chain of thought
    channel: str | None = None  # an assistant's text: "commentary" for a preamble (default: harmony's choice)


@dataclass(frozen=True)
class ToolInput:
    name: str
    description: str = ""
    parameters: Mapping | str | None = None  # a JSON schema, parsed (HTTP) or as JSON text (gRPC)


@dataclass(frozen=True)
class ChatInput:
    model: str | None
    messages: tuple[MessageInput, ...]
    sampling: SamplingInput = SamplingInput()
    tools: tuple[ToolInput, ...] = ()
    tool_choice: str | None = None  # "auto", "none", "required"; None: "auto" with tools, else "none"
    tool_choice_function: str | None = None  # a function the reply must call (tool_choice then unused)
    reasoning_effort: str = "medium"
    include_reasoning: bool = True


@dataclass(frozen=True)
class CompletionInput:
    model: str | None
    prompts: tuple[str | tuple[int, ...], ...]  # text (encoded without a template) or token ids
    sampling: SamplingInput = SamplingInput()


# --- what the gateway runs ---------------------------------------------------------------------------

@dataclass(frozen=True)
class ToolChoice:
    mode: str = "auto"  # "auto", "none" (tools not shown to the model), "required", "function"
    name: str | None = None  # mode "function": the function to call


@dataclass(frozen=True)
class Generation:
    """One admitted request as the gateway runs it: token ids in, how to read the tokens out."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    sampling: SamplingParams
    n: int = 1  # independent choices; choice i > 0 uses seed + i when a seed is given
    stop: tuple[str, ...] = ()  # stop strings, on the answer's text
    harmony: bool = True  # parse the completion as harmony (chat), else plain text (completions)
    prefill_token_ids: tuple[int, ...] = ()  # the start of the reply, already at the prompt's end
    include_reasoning: bool = True
    cache_salt: str = ""  # the caller's tenant (from its API key): its own prefix-cache namespace


def prepare_chat(chat: ChatInput, context: AdmissionContext) -> Generation:
    """The chat as a generation: limits, conversion, harmony rendering, prompt checks.

    Raises:
        ClientError naming the field (NotFoundError for another model, ContextLengthError).
    """
    check_model(chat.model, context.model_name)
    limits = context.limits
    check_count("messages", len(chat.messages), 1, limits.max_messages, "gateway.max_messages")
    check_count("tools", len(chat.tools), 0, limits.max_tools, "gateway.max_tools")
    _check_sampling_limits(chat.sampling, limits, "top_logprobs")
    if chat.reasoning_effort not in REASONING_EFFORTS:
        raise _must("reasoning_effort", "one of low, medium, high", chat.reasoning_effort)
    tools = [_function_tool(tool, i, limits) for i, tool in enumerate(chat.tools)]
    messages = [_chat_message(message, i) for i, message in enumerate(chat.messages)]
    sampling = _sampling_params(chat.sampling, limits, "top_logprobs")
    prompt, prefill = render_chat(messages, tools, _tool_choice(chat, tools), chat.reasoning_effort,
                                  context.current_date)
    sampling = _fit_prompt(prompt, sampling, context, "messages")
    return Generation(context.request_id, prompt, sampling, chat.sampling.n, _stop_strings(chat.sampling),
                      harmony=True, prefill_token_ids=prefill, include_reasoning=chat.include_reasoning,
                      cache_salt=context.tenant)


def prepare_completion(completion: CompletionInput, context: AdmissionContext,
                       stop_token_ids: tuple[int, ...] = ()) -> tuple[Generation, ...]:
    """One generation per prompt (ids `<request id>-<i>` when there are several), no template. The
    engine stops at `stop_token_ids` (none by default: raw text runs to max_tokens or a stop string).

    Raises:
        ClientError naming the field.
    """
    check_model(completion.model, context.model_name)
    limits = context.limits
    check_count("prompt", len(completion.prompts), 1, limits.max_prompts, "gateway.max_prompts")
    _check_sampling_limits(completion.sampling, limits, "logprobs")
    sampling = dataclasses.replace(_sampling_params(completion.sampling, limits, "logprobs"),
                                   stop_token_ids=stop_token_ids)
    several = len(completion.prompts) > 1
    generations = []
    for i, prompt in enumerate(completion.prompts):
        if isinstance(prompt, str):
            with _tokenizer_failures_refused("prompt"):
                ids = tuple(encode(prompt))
        else:
            ids = prompt
        if not ids:
            raise InvalidRequestError("prompt", "prompt must not be empty")
        request_id = f"{context.request_id}-{i}" if several else context.request_id
        generations.append(Generation(request_id, ids, _fit_prompt(ids, sampling, context, "prompt"),
                                      completion.sampling.n, _stop_strings(completion.sampling), harmony=False,
                                      cache_salt=context.tenant))
    return tuple(generations)


def check_model(model: str | None, served: str | None) -> None:
    """Raises NotFoundError (listing the served model) when `model` names another one."""
    if model and served is not None and model != served:
        raise NotFoundError(f"model {shorten(model)} is not served here; the models are: [{served!r}] "
                            f"(GET /v1/models)", "model")


def render_chat(messages: list[ChatMessage], tools: list[FunctionTool], tool_choice: ToolChoice,
                reasoning_effort: str, current_date: str | None = None) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(prompt token ids, prefill) for a chat: harmony's rendering, then for tool_choice "required" or a
    named function the start of a tool call (the model cannot answer otherwise: there is no guided
    decoding here).

    Raises:
        InvalidRequestError naming "messages", "tools" or "tool_choice".
    """
    names = [tool.name for tool in tools]
    if len(set(names)) != len(names):
        raise InvalidRequestError("tools", f"tools must have distinct names, got {shorten(names)}")
    if tool_choice.mode in ("required", "function") and not tools:
        raise InvalidRequestError("tool_choice", f"tool_choice {tool_choice.mode!r} needs tools, got none")
    if tool_choice.mode == "function" and tool_choice.name not in names:
        raise InvalidRequestError("tool_choice", f"tool_choice names function {shorten(tool_choice.name)}, which "
                                                 f"is not among the tools {shorten(names)}")
    try:
        with _tokenizer_failures_refused("messages"):
            prompt = render_prompt(messages, tools=() if tool_choice.mode == "none" else tools,
                                   reasoning_effort=reasoning_effort, current_date=current_date)
    except ChatMessageError as e:
        raise InvalidRequestError(f"messages.{e.index}", f"messages.{e.index}: {shorten(e.problem, 300)}") from None
    except ValueError as e:
        raise InvalidRequestError("messages", str(e)) from None
    except HarmonyError as e:  # harmony refused what the client sent (a schema it cannot declare, ...)
        raise InvalidRequestError("messages", f"the chat cannot be rendered in harmony: {shorten(str(e), 200)}") from None
    prefill: list[int] = []
    if tool_choice.mode in ("required", "function"):
        prefill = tool_call_prefill(tool_choice.name)
    return tuple(prompt + prefill), tuple(prefill)


@contextlib.contextmanager
def _tokenizer_failures_refused(param: str):
    """openai-harmony's tokenizer panics (a Rust panic: a BaseException, not an Exception) when its
    regex overflows its stack, as on a word of about a million letters: that is the client's input."""
    try:
        yield
    except BaseException as e:
        if type(e).__name__ != "PanicException":
            raise
        raise InvalidRequestError(param, f"{param} cannot be tokenized: harmony's tokenizer failed on it (e.g. on "
                                         f"a very long run of characters without spaces or punctuation)") from None


# --- the rules ---------------------------------------------------------------------------------------

def _must(param: str, rule: str, value: object, setting: str = "") -> InvalidRequestError:
    where = f" ({setting})" if setting else ""
    return InvalidRequestError(param, f"{param} must be {rule}{where}, got {shorten(value)}")


def check_count(param: str, count: int, least: int, most: int, setting: str) -> None:
    """Refuses a list of `count` entries outside [least, most], naming the field and its setting."""
    if count < least:
        raise InvalidRequestError(param, f"{param} must not be empty")
    if count > most:
        raise InvalidRequestError(param, f"{param} must have at most {most} entries ({setting}), got {count}")


def _check_sampling_limits(s: SamplingInput, limits: RequestLimits, logprobs_param: str) -> None:
    """The fields that multiply work or memory: checked before anything is built."""
    if not 1 <= s.n <= limits.max_n:
        raise _must("n", f"in [1, {limits.max_n}]", s.n, "gateway.max_n")
    if s.logprobs is not None and not 0 <= s.logprobs <= limits.max_logprobs:
        raise _must(logprobs_param, f"in [0, {limits.max_logprobs}]", s.logprobs, "engine.max_logprobs")
    if len(s.stop) > limits.max_stop_strings:
        raise InvalidRequestError("stop", f"stop must have at most {limits.max_stop_strings} strings "
                                          f"(gateway.max_stop_strings), got {len(s.stop)}")
    for i, stop in enumerate(s.stop):
        if len(stop) > limits.max_stop_chars:
            raise InvalidRequestError("stop", f"stop strings must have at most {limits.max_stop_chars} characters "
                                              f"(gateway.max_stop_chars), stop[{i}] has {len(stop)}")
    if limits.max_output_tokens is not None and s.max_tokens is not None and s.max_tokens > limits.max_output_tokens:
        raise _must("max_tokens", f"<= {limits.max_output_tokens}", s.max_tokens, "gateway.max_output_tokens")


def _sampling_params(s: SamplingInput, limits: RequestLimits, logprobs_param: str) -> SamplingParams:
    try:
        return SamplingParams(max_tokens=s.max_tokens, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
                              min_p=s.min_p, presence_penalty=s.presence_penalty,
                              frequency_penalty=s.frequency_penalty, seed=s.seed, logprobs=s.logprobs)
    except InvalidRequestError as e:
        if e.param == "logprobs" and logprobs_param != "logprobs":
            raise InvalidRequestError(logprobs_param, str(e).replace("logprobs", logprobs_param, 1)) from None
        raise


def _stop_strings(s: SamplingInput) -> tuple[str, ...]:
    return tuple(stop for stop in s.stop if stop)


def _chat_message(m: MessageInput, i: int) -> ChatMessage:
    try:
        calls = tuple(ToolCall(c.name, c.arguments, c.id) for c in m.tool_calls)
        return ChatMessage(m.role, m.content, name=m.name if m.role == "tool" else None, tool_calls=calls,
                           tool_call_id=m.tool_call_id, reasoning=m.reasoning, channel=m.channel)
    except ValueError as e:
        raise InvalidRequestError(f"messages.{i}", f"messages.{i}: {e}") from None


def _function_tool(tool: ToolInput, i: int, limits: RequestLimits) -> FunctionTool:
    param = f"tools.{i}.function.parameters"
    schema = tool.parameters
    text = schema if isinstance(schema, str) else json.dumps(schema) if schema is not None else ""
    if len(text) > limits.max_tool_schema_bytes:
        raise InvalidRequestError(param, f"{param} must be at most {limits.max_tool_schema_bytes} bytes of JSON "
                                         f"(gateway.max_tool_schema_bytes), got {len(text)}")
    if isinstance(schema, str):
        schema = parse_json(schema, param, limits.max_json_depth) if schema else None
    elif schema is not None and json_depth(schema, limits.max_json_depth) > limits.max_json_depth:
        raise InvalidRequestError(param, f"{param} is nested deeper than {limits.max_json_depth} levels "
                                         f"(gateway.max_json_depth)")
    if schema is not None and not isinstance(schema, dict):
        raise InvalidRequestError(param, f"{param} must be a JSON object (a schema), got {type(schema).__name__}")
    try:
        return FunctionTool(tool.name, tool.description, schema)
    except ValueError as e:
        raise InvalidRequestError(f"tools.{i}.function.name", f"tools.{i}.function.{e}") from None


def _tool_choice(chat: ChatInput, tools: list[FunctionTool]) -> ToolChoice:
    if chat.tool_choice_function is not None:
        return ToolChoice("function", chat.tool_choice_function)
    choice = chat.tool_choice or ("auto" if tools else "none")
    if choice not in TOOL_CHOICES:
        raise _must("tool_choice", "auto, none, required or a function", choice)
    return ToolChoice(choice)


def _fit_prompt(prompt: tuple[int, ...], sampling: SamplingParams, context: AdmissionContext,
                param: str) -> SamplingParams:
    """Refuses a prompt or max_tokens that cannot fit the limits or the model's context; returns the
    sampling with max_tokens capped by `max_output_tokens` when the request set none."""
    limits, model, num_prompt = context.limits, context.model, len(prompt)
    if limits.max_prompt_tokens is not None and num_prompt > limits.max_prompt_tokens:
        raise ContextLengthError(f"the prompt has {num_prompt} tokens; this server accepts at most "
                                 f"{limits.max_prompt_tokens} (gateway.max_prompt_tokens)", param)
    if model is not None:
        if num_prompt >= model.max_model_len:
            raise ContextLengthError(f"This model's maximum context length is {model.max_model_len} tokens; the "
                                     f"prompt has {num_prompt} tokens and at least one must be generated", param)
        bad = [t for t in prompt if not 0 <= t < model.vocab_size][:5]
        if bad:
            raise InvalidRequestError(param, f"{param} must hold token ids in [0, {model.vocab_size}), got {bad}")
    max_tokens = sampling.max_tokens
    if max_tokens is None and limits.max_output_tokens is not None:
        room = model.max_model_len - num_prompt if model is not None else limits.max_output_tokens
        max_tokens = min(limits.max_output_tokens, room)
        sampling = dataclasses.replace(sampling, max_tokens=max_tokens)
    if model is not None and max_tokens is not None and num_prompt + max_tokens > model.max_model_len:
        raise ContextLengthError(
            f"This model's maximum context length is {model.max_model_len} tokens; the prompt has {num_prompt} "
            f"tokens and max_tokens asks for {max_tokens} more (at most {model.max_model_len - num_prompt})",
            "max_tokens")
    return sampling


# --- JSON -------------------------------------------------------------------------------------------

def parse_json(text: str | bytes, param: str, max_depth: int) -> object:
    """JSON text -> value, refusing malformed or too deeply nested input by name (never a RecursionError)."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as e:
            raise InvalidRequestError(param, f"{param} must be UTF-8 JSON: byte {e.start} is not UTF-8") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise InvalidRequestError(param, f"{param} must be JSON: {e}") from None
    except RecursionError:
        value = None
        depth = max_depth + 1
    else:
        depth = json_depth(value, max_depth)
    if depth > max_depth:
        raise InvalidRequestError(param, f"{param} is nested deeper than {max_depth} levels (gateway.max_json_depth)")
    return value


def json_depth(value: object, limit: int) -> int:
    """Nesting depth of a parsed JSON value (a scalar is 0), counted up to `limit` + 1 and no further."""
    depth, level = 0, [value]
    while level and depth <= limit:
        children = []
        for item in level:
            if isinstance(item, dict):
                children += item.values()
            elif isinstance(item, list):
                children += item
        if not children and not any(isinstance(item, dict | list) for item in level):
            break
        depth += 1
        level = children
    return depth


def renamed(error: ClientError, rename) -> ClientError:
    """`error` with its field spelled as another API spells it: `rename(param)` replaces the param and its
    mentions in the message (e.g. "top_logprobs" -> "sampling.logprobs" for gRPC)."""
    if not error.param:
        return error
    new = rename(error.param)
    if new == error.param:
        return error
    copy = type(error).__new__(type(error))
    copy.__dict__.update(error.__dict__)
    copy.param = new
    copy.args = (re.sub(rf"(?<![\w.]){re.escape(error.param)}(?![\w\[])", lambda _: new, str(error)),)
    return copy
