"""The OpenAI API's wire format: its request shapes (validated with pydantic, unknown fields refused),
their translation into admission inputs, and the builders of its response bodies from choice events.

`admit_chat_json` / `admit_completion_json` turn a request body's bytes into the generation(s) to run
and the options of the response (an admission worker's job: neither Ray nor FastAPI here). Limits are
admission's (serve/admission.py), the same for every API; pydantic only checks the JSON types.

Fields OpenAI defines that this server cannot honour (response_format other than text, logit_bias,
audio, echo, suffix, ...) are refused with a 400 naming them, never silently ignored; fields that do
not change the result (user, metadata, store, service_tier, parallel_tool_calls) are accepted.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from engine.outputs import TokenLogprobs
from gptoss.errors import InvalidRequestError
from gptoss.harmony import TextDelta, ToolCallArgsDelta, ToolCallStart
from gptoss.tokenizer import token_bytes
from serve.admission import (
    AdmissionContext,
    ChatInput,
    CompletionInput,
    Generation,
    MessageInput,
    SamplingInput,
    ToolCallInput,
    ToolInput,
    parse_json,
    prepare_chat,
    prepare_completion,
)
from serve.choices import ChoiceEvent, ChoiceUsage
from serve.validation import describe_validation_error

_PENALTY = Annotated[float, Field(ge=-2.0, le=2.0)]
ModelT = TypeVar("ModelT", bound=BaseModel)


class StrictShape(BaseModel):
    # JSON types as sent: "1" is not a number, 1 is not a boolean; NaN and infinities are refused.
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


def _refuse_unsupported(values: dict, names: tuple[str, ...], empty_ok: tuple = (None,)) -> None:
    for name in names:
        if values.get(name) not in empty_ok:
            raise ValueError(f"{name} is not supported by this server")


class TextPart(StrictShape):
    type: Literal["text"]
    text: str


class FunctionCall(StrictShape):
    name: str
    arguments: str = ""


class ToolCallIn(StrictShape):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessageIn(StrictShape):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None
    reasoning: str | None = None  # an earlier assistant turn's chain of thought
    reasoning_content: str | None = None  # the same, as older clients name it

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class FunctionDef(StrictShape):
    name: str
    description: str = ""
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolDef(StrictShape):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(StrictShape):
    name: str


class NamedToolChoice(StrictShape):
    type: Literal["function"]
    function: NamedFunction


class StreamOptions(StrictShape):
    include_usage: bool = False
    continuous_usage_stats: bool = False


# OpenAI's metadata: up to 16 string pairs, keys up to 64 characters, values up to 512.
Metadata = Annotated[dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]],
                     Field(max_length=16)]


class _SamplingFields(StrictShape):
    model: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] = 1.0
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0
    top_k: Annotated[int, Field(ge=0)] = 0  # extension (vLLM): 0 keeps every token
    min_p: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0  # extension (vLLM)
    n: int = 1  # admission checks it against gateway.max_n
    seed: Annotated[int, Field(ge=0, lt=2**63)] | None = None
    stop: str | list[str] | None = None
    presence_penalty: _PENALTY = 0.0
    frequency_penalty: _PENALTY = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    timeout: Annotated[float, Field(gt=0)] | None = None  # seconds; the request is aborted past it

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def sampling_input(self, max_tokens: int | None, logprobs: int | None) -> SamplingInput:
        return SamplingInput(n=self.n, max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p,
                             top_k=self.top_k, min_p=self.min_p, presence_penalty=self.presence_penalty,
                             frequency_penalty=self.frequency_penalty, seed=self.seed, logprobs=logprobs,
                             stop=self.stop_strings())

    def response_options(self, logprobs: bool) -> ResponseOptions:
        options = self.stream_options
        return ResponseOptions(self.stream, options is not None and options.include_usage,
                               options is not None and options.include_usage and options.continuous_usage_stats,
                               logprobs, self.timeout)


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessageIn]
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0)] | None = None
    tools: list[ToolDef] | None = None
    tool_choice: Literal["auto", "none", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    reasoning_effort: Literal["low", "medium", "high"] = "medium"
    include_reasoning: bool = True
    response_format: dict[str, Any] | None = None
    metadata: Metadata | None = None
    store: bool | None = None
    service_tier: str | None = None
    modalities: list[str] | None = None
    audio: dict[str, Any] | None = None
    prediction: dict[str, Any] | None = None
    web_search_options: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _supported(self) -> ChatCompletionRequest:
        _refuse_unsupported(self.__dict__, ("audio", "prediction", "web_search_options"))
        _refuse_unsupported(self.__dict__, ("modalities",), (None, ["text"]))
        _refuse_unsupported(self.__dict__, ("logit_bias",), (None, {}))
        if self.response_format is not None and self.response_format.get("type") != "text":
            raise ValueError("response_format other than {\"type\": \"text\"} is not supported by this server")
        if self.max_tokens is not None and self.max_completion_tokens is not None \
                and self.max_tokens != self.max_completion_tokens:
            raise ValueError("max_tokens and max_completion_tokens differ; give one of them")
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    @property
    def output_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def chat_input(self) -> ChatInput:
        """The request as admission takes it."""
        messages = tuple(MessageInput(m.role, m.text(), m.name,
                                      tuple(ToolCallInput(c.function.name, c.function.arguments, c.id)
                                            for c in m.tool_calls or ()),
                                      m.tool_call_id, m.reasoning or m.reasoning_content) for m in self.messages)
        tools = tuple(ToolInput(t.function.name, t.function.description, t.function.parameters)
                      for t in self.tools or ())
        named = isinstance(self.tool_choice, NamedToolChoice)
        return ChatInput(self.model, messages, self.sampling_input(self.output_limit, self.num_logprobs), tools,
                         tool_choice=None if named else self.tool_choice,
                         tool_choice_function=self.tool_choice.function.name if named else None,
                         reasoning_effort=self.reasoning_effort, include_reasoning=self.include_reasoning)


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: Annotated[int, Field(ge=1)] | None = 16  # OpenAI's default for completions
    logprobs: Annotated[int, Field(ge=0)] | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: Annotated[int, Field(ge=1)] | None = None

    @model_validator(mode="after")
    def _supported(self) -> CompletionRequest:
        _refuse_unsupported(self.__dict__, ("echo",), (False,))
        _refuse_unsupported(self.__dict__, ("suffix",))
        _refuse_unsupported(self.__dict__, ("logit_bias",), (None, {}))
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of other than n is not supported by this server")
        return self

    def prompts(self) -> tuple[str | tuple[int, ...], ...]:
        """One entry per prompt: text, or token ids."""
        p = self.prompt
        if isinstance(p, str):
            return (p,)
        if p and isinstance(p[0], int):
            return (tuple(p),)
        return tuple(q if isinstance(q, str) else tuple(q) for q in p)

    def completion_input(self) -> CompletionInput:
        """The request as admission takes it."""
        return CompletionInput(self.model, self.prompts(), self.sampling_input(self.max_tokens, self.logprobs))


@dataclass(frozen=True)
class ResponseOptions:
    """What shapes the response, besides the generations."""

    stream: bool
    include_usage: bool  # a usage chunk at the end of a stream
    continuous_usage: bool  # usage on every chunk (vLLM's continuous_usage_stats)
    logprobs: bool
    timeout_s: float | None  # the request is aborted past it


def parse_body(model: type[ModelT], body: dict) -> ModelT:
    """A request shape from a parsed JSON body; the error names the first wrong field."""
    try:
        return model.model_validate(body)
    except ValidationError as e:
        raise InvalidRequestError(_param(e), "; ".join(describe_validation_error(e))) from None


def _param(error: ValidationError) -> str:
    """The first problem's field as a dotted path, without pydantic's union-member tags."""
    parts = [str(p)[:64] for p in error.errors()[0]["loc"]]
    kept = [p for p in parts if not ("[" in p or p in ("str", "int", "float", "bool", "list", "dict")
                                     or p.startswith("function-") or p[:1].isupper())]
    return ".".join(kept) or "body"


def read_body_json(body: bytes, context: AdmissionContext) -> dict:
    """The request body as a JSON object (refused by name when it is not one, or nests too deeply)."""
    data = parse_json(body, "body", context.limits.max_json_depth)
    if not isinstance(data, dict):
        raise InvalidRequestError("body", f"the request body must be a JSON object, got {type(data).__name__}")
    return data


def admit_chat_json(body: bytes, context: AdmissionContext) -> tuple[Generation, ResponseOptions]:
    """`POST /v1/chat/completions`' body -> (the generation, the response's options)."""
    chat = parse_body(ChatCompletionRequest, read_body_json(body, context))
    return prepare_chat(chat.chat_input(), context), chat.response_options(chat.logprobs)


def admit_completion_json(body: bytes, context: AdmissionContext
                          ) -> tuple[tuple[Generation, ...], ResponseOptions]:
    """`POST /v1/completions`' body -> (a generation per prompt, the response's options)."""
    request = parse_body(CompletionRequest, read_body_json(body, context))
    generations = prepare_completion(request.completion_input(), context)
    return generations, request.response_options(request.logprobs is not None)


# --- responses ------------------------------------------------------------------------------------

def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now_s() -> int:
    return int(time.time())


def usage_body(usages: list[ChoiceUsage | None], n: int) -> dict:
    """OpenAI's usage over a request's choices; choices come n per prompt, each prompt counted once."""
    done = [u for u in usages if u is not None]
    prompt = sum(u.num_prompt_tokens for u in usages[::n] if u is not None)
    completion = sum(u.num_output_tokens for u in done)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": sum(u.num_cached_tokens for u in usages[::n] if u is not None)},
            "completion_tokens_details": {"reasoning_tokens": sum(u.num_reasoning_tokens for u in done)}}


def token_text(token_id: int) -> str:
    return token_bytes(token_id).decode("utf-8", errors="replace")


def chat_logprobs(logprobs: tuple[TokenLogprobs, ...]) -> list[dict]:
    """OpenAI's chat `logprobs.content` entries."""
    def entry(token_id: int, logprob: float) -> dict:
        return {"token": token_text(token_id), "logprob": logprob, "bytes": list(token_bytes(token_id))}

    return [entry(lp.token_id, lp.logprob) | {"top_logprobs": [entry(t, v) for t, v in
                                                                zip(lp.top_token_ids, lp.top_logprobs, strict=True)]}
            for lp in logprobs]


def completion_logprobs(logprobs: tuple[TokenLogprobs, ...], text_offset: int) -> dict:
    """OpenAI's legacy completions `logprobs` object; `text_offset` is where these tokens' text starts."""
    tokens = [token_text(lp.token_id) for lp in logprobs]
    offsets, at = [], text_offset
    for token in tokens:
        offsets.append(at)
        at += len(token)
    return {"tokens": tokens, "token_logprobs": [lp.logprob for lp in logprobs],
            "top_logprobs": [{token_text(t): v for t, v in zip(lp.top_token_ids, lp.top_logprobs, strict=True)}
                             for lp in logprobs],
            "text_offset": offsets}


class ChatDeltaBuilder:
    """Per request: the OpenAI chat delta of each event."""

    def __init__(self, include_reasoning: bool):
        self.include_reasoning = include_reasoning
        self._started: set[int] = set()

    def delta(self, event: ChoiceEvent) -> dict:
        delta: dict[str, Any] = {}
        if event.index not in self._started:
            self._started.add(event.index)
            delta["role"] = "assistant"
        content = "".join(d.text for d in event.deltas if isinstance(d, TextDelta) and d.channel != "analysis")
        reasoning = "".join(d.text for d in event.deltas if isinstance(d, TextDelta) and d.channel == "analysis")
        if content:
            delta["content"] = content
        if reasoning and self.include_reasoning:
            delta["reasoning"] = delta["reasoning_content"] = reasoning
        calls = []
        for d in event.deltas:
            if isinstance(d, ToolCallStart):
                calls.append({"index": d.index, "id": d.call_id, "type": "function",
                              "function": {"name": d.name, "arguments": ""}})
            elif isinstance(d, ToolCallArgsDelta):
                if calls and calls[-1]["index"] == d.index:
                    calls[-1]["function"]["arguments"] += d.arguments
                else:
                    calls.append({"index": d.index, "function": {"arguments": d.arguments}})
        if calls:
            delta["tool_calls"] = calls
        return delta


class ChatChoiceAccumulator:
    """A non-streamed chat choice, built from its events."""

    def __init__(self, index: int, builder: ChatDeltaBuilder, want_logprobs: bool):
        self.index, self.builder, self.want_logprobs = index, builder, want_logprobs
        self.content: list[str] = []
        self.reasoning: list[str] = []
        self.calls: list[dict] = []
        self.logprobs: list[TokenLogprobs] = []
        self.finish_reason: str | None = None
        self.usage: ChoiceUsage | None = None

    def add(self, event: ChoiceEvent) -> None:
        for d in event.deltas:
            if isinstance(d, TextDelta):
                (self.reasoning if d.channel == "analysis" else self.content).append(d.text)
            elif isinstance(d, ToolCallStart):
                self.calls.append({"id": d.call_id, "type": "function",
                                   "function": {"name": d.name, "arguments": ""}})
            elif isinstance(d, ToolCallArgsDelta):
                self.calls[-1]["function"]["arguments"] += d.arguments
        self.logprobs += event.logprobs
        if event.finish_reason is not None:
            self.finish_reason, self.usage = event.finish_reason, event.usage

    def body(self) -> dict:
        content = "".join(self.content)
        reasoning = "".join(self.reasoning) if self.builder.include_reasoning else ""
        message: dict[str, Any] = {"role": "assistant", "content": content or (None if self.calls else ""),
                                   "reasoning": reasoning or None, "reasoning_content": reasoning or None}
        if self.calls:
            message["tool_calls"] = self.calls
        return {"index": self.index, "message": message, "finish_reason": self.finish_reason,
                "logprobs": {"content": chat_logprobs(tuple(self.logprobs))} if self.want_logprobs else None}
