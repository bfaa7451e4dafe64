"""Chat <-> harmony tokens: render prompts, parse completions (whole or streamed).

gpt-oss speaks the harmony format (GPTOSS_SPEC.md section 4). The serving layer hands us an
OpenAI-style chat as frozen dataclasses; rendering and parsing are delegated to openai-harmony so the
format details (system message text, tool namespaces, header grammar) live in one place.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from openai_harmony import (
    Author,
    Conversation,
    DeveloperContent,
    HarmonyError,
    Message,
    Role,
    StreamableParser,
    SystemContent,
    TextContent,
    ToolDescription,
)
from openai_harmony import ReasoningEffort as HarmonyReasoningEffort

from gptoss.tokenizer import (
    MESSAGE_END_IDS,
    MESSAGE_ID,
    START_ID,
    STARTOFTEXT_ID,
    STOP_TOKEN_IDS,
    get_encoding,
)

ROLES = ("system", "developer", "user", "assistant", "tool")
CHANNELS = ("analysis", "commentary", "final")
ReasoningEffort = Literal["low", "medium", "high"]
REASONING_EFFORTS: tuple[ReasoningEffort, ...] = ("low", "medium", "high")
DEFAULT_KNOWLEDGE_CUTOFF = "2024-06"  # what gpt-oss was trained with; harmony's default too

_FUNCTIONS_PREFIX = "functions."
_TOOL_NAME_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")  # OpenAI's rule; keeps the TypeScript-like decl valid


class ChatMessageError(ValueError):
    """A message that cannot be rendered; `index` is its position in the chat."""

    def __init__(self, index: int, problem: str):
        super().__init__(f"messages[{index}]: {problem}")
        self.index, self.problem = index, problem


@dataclass(frozen=True)
class ToolCall:
    """A function call made by the assistant earlier in the chat (an OpenAI `tool_calls` entry)."""

    name: str
    arguments: str  # JSON text, given back to the model verbatim
    id: str | None = None

    def __post_init__(self) -> None:
        _check_tool_name(self.name, "name")


@dataclass(frozen=True)
class ChatMessage:
    """One chat message as the serving layer receives it.

    `system` and `developer` messages become the developer instructions (OpenAI's mapping for
    gpt-oss). A `tool` message names its function with `name`, or with `tool_call_id` pointing at an
    earlier assistant tool call.
    """

    role: str
    content: str = ""
    name: str | None = None
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None
    channel: str | None = None  # assistant only; default final (commentary when it has tool calls)
    reasoning: str | None = None  # assistant only: its chain of thought, rendered on analysis

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}, got {self.role!r}")
        if self.channel is not None and self.channel not in CHANNELS:
            raise ValueError(f"channel must be one of {', '.join(CHANNELS)} or None, got {self.channel!r}")
        if self.role != "assistant" and (self.tool_calls or self.channel or self.reasoning):
            raise ValueError(f"tool_calls, channel and reasoning need role 'assistant', got {self.role!r}")


@dataclass(frozen=True)
class FunctionTool:
    """A function the model may call, declared to it in the developer message."""

    name: str
    description: str = ""
    # JSON schema of the arguments object; None declares a function without arguments.
    parameters: Mapping[str, object] | None = field(default=None, hash=False)

    def __post_init__(self) -> None:
        _check_tool_name(self.name, "name")


def _check_tool_name(name: str, field_name: str) -> None:
    if not _TOOL_NAME_RE.fullmatch(name):
        raise ValueError(f"{field_name} must match [A-Za-z0-9_-]{{1,64}}, got {name!r}")


def render_prompt(
    messages: Sequence[ChatMessage],
    *,
    tools: Sequence[FunctionTool] = (),
    reasoning_effort: str = "medium",
    developer_instructions: str | None = None,
    current_date: str | None = None,
    knowledge_cutoff: str = DEFAULT_KNOWLEDGE_CUTOFF,
) -> list[int]:
    """Prompt token ids for a chat, ending with `<|start|>assistant` for the model to continue.

    Args:
        messages: the chat so far; must contain at least one message.
        tools: functions declared under `namespace functions` in the developer message.
        reasoning_effort: "low", "medium" or "high" (the system message's `Reasoning:` line).
        developer_instructions: server-side instructions, placed before any system/developer text.
        current_date: e.g. "2025-08-05"; omitted from the system message when None.
        knowledge_cutoff: the system message's `Knowledge cutoff:` line.
    Raises:
        ValueError: empty messages, an unknown reasoning effort, or a tool message whose function
            cannot be determined.
    """
    if not messages:
        raise ValueError("messages must be non-empty")
    if reasoning_effort not in REASONING_EFFORTS:
        raise ValueError(
            f"reasoning_effort must be one of {', '.join(REASONING_EFFORTS)}, got {reasoning_effort!r}"
        )
    system = (
        SystemContent.new()
        .with_reasoning_effort(HarmonyReasoningEffort(reasoning_effort.capitalize()))
        .with_knowledge_cutoff(knowledge_cutoff)
    )
    if current_date is not None:
        system = system.with_conversation_start_date(current_date)
    harmony_messages = [Message.from_role_and_content(Role.SYSTEM, system)]

    instructions = [developer_instructions] if developer_instructions else []
    instructions += [m.content for m in messages if m.role in ("system", "developer") and m.content]
    if instructions or tools:
        developer = DeveloperContent.new()
        if instructions:
            developer = developer.with_instructions("\n\n".join(instructions))
        if tools:
            developer = developer.with_function_tools([_tool_description(t) for t in tools])
        harmony_messages.append(Message.from_role_and_content(Role.DEVELOPER, developer))

    harmony_messages += _chat_to_harmony(messages)
    # Harmony drops analysis that precedes the last final answer, as the model was trained.
    return get_encoding().render_conversation_for_completion(
        Conversation.from_messages(harmony_messages), Role.ASSISTANT
    )


def _tool_description(tool: FunctionTool) -> ToolDescription:
    parameters = dict(tool.parameters) if tool.parameters is not None else None
    return ToolDescription.new(tool.name, tool.description, parameters=parameters)


def _chat_to_harmony(messages: Sequence[ChatMessage]) -> list[Message]:
    out: list[Message] = []
    call_id_to_name: dict[str, str] = {}
    for i, m in enumerate(messages):
        if m.role == "user":
            out.append(Message.from_role_and_content(Role.USER, m.content))
        elif m.role == "assistant":
            out += _assistant_to_harmony(m)
            call_id_to_name.update({c.id: c.name for c in m.tool_calls if c.id is not None})
        elif m.role == "tool":
            name = m.name or call_id_to_name.get(m.tool_call_id or "")
            if not name:
                raise ChatMessageError(
                    i, f"name must be set, or tool_call_id must match an earlier assistant tool call, got "
                       f"name={m.name!r} tool_call_id={m.tool_call_id!r}"
                )
            author = Author.new(Role.TOOL, _FUNCTIONS_PREFIX + name)
            out.append(
                Message.from_author_and_content(author, m.content)
                .with_recipient("assistant")
                .with_channel("commentary")
            )
        # system/developer messages were folded into the developer instructions.
    return out


def _assistant_to_harmony(m: ChatMessage) -> list[Message]:
    out: list[Message] = []
    if m.reasoning:
        out.append(Message.from_role_and_content(Role.ASSISTANT, m.reasoning).with_channel("analysis"))
    if m.content:
        # Text next to tool calls is a preamble, which harmony puts on the commentary channel.
        channel = m.channel or ("commentary" if m.tool_calls else "final")
        out.append(Message.from_role_and_content(Role.ASSISTANT, m.content).with_channel(channel))
    for call in m.tool_calls:
        out.append(
            Message.from_role_and_content(Role.ASSISTANT, call.arguments)
            .with_channel("commentary")
            .with_recipient(_FUNCTIONS_PREFIX + call.name)
            .with_content_type("<|constrain|>json")
        )
    return out


def tool_call_prefill(name: str | None) -> list[int]:
    """Tokens that start the assistant's reply as a call of function `name` (any function when None),
    appended to a prompt from `render_prompt` to force a tool call (OpenAI's tool_choice "required"
    or a named function). For a named function the header is complete and the model writes the JSON
    arguments; for None it stops after "to=functions" and the model writes the name (".get_weather")
    and the rest of the header, so the function name is tokenized as the model learned it.
    """
    header = (
        Message.from_role_and_content(Role.ASSISTANT, "")
        .with_channel("commentary")
        .with_recipient(_FUNCTIONS_PREFIX + (name or "x"))
        .with_content_type("<|constrain|>json")
    )
    encoding = get_encoding()
    tokens = encoding.render(header)  # <|start|>assistant to=functions.NAME<|channel|>...<|message|>...
    if name is None:
        stop = tokens.index(encoding.encode("functions", allowed_special=set())[0], 2) + 1
    else:
        _check_tool_name(name, "name")
        stop = tokens.index(MESSAGE_ID) + 1
    return tokens[2:stop]  # what follows the prompt's <|start|>assistant


@dataclass(frozen=True)
class TextDelta:
    """New text of a message on `channel` ("analysis", "commentary" preamble, or "final")."""

    channel: str
    text: str


@dataclass(frozen=True)
class ToolCallStart:
    """The model began a tool call; its arguments follow as ToolCallArgsDelta with the same index."""

    index: int  # position among this completion's tool calls
    recipient: str  # e.g. "functions.get_weather"
    name: str  # the recipient without the "functions." namespace
    call_id: str = ""  # the id an API gives the call (OpenAI's `call_...`); the serving layer sets it


@dataclass(frozen=True)
class ToolCallArgsDelta:
    index: int
    arguments: str  # the next piece of the JSON arguments text


StreamDelta = TextDelta | ToolCallStart | ToolCallArgsDelta


@dataclass(frozen=True)
class ParsedToolCall:
    recipient: str
    name: str
    arguments: str  # JSON text as generated; may be invalid JSON if the completion was cut off


@dataclass(frozen=True)
class ParsedCompletion:
    analysis: str  # chain of thought; not for end users
    commentary: str  # preambles the model wrote before tool calls
    final: str  # the answer
    tool_calls: tuple[ParsedToolCall, ...]
    truncated: bool  # no <|return|>/<|call|> at the end: cut off by max_tokens or aborted


@dataclass
class _OpenMessage:
    """The message whose content is being streamed."""

    channel: str
    tool_index: int | None  # set when the message is a tool call
    emitted: list[str] = field(default_factory=list)


class StreamingParser:
    """Incremental parser of one completion, fed token ids as they are sampled.

    The completion is what follows a prompt from `render_prompt` (it starts after
    `<|start|>assistant`); a completion that starts with `<|start|>` itself is accepted too. Tokens that
    break the harmony grammar are skipped up to the next `<|start|>` rather than failing the request.
    """

    def __init__(self) -> None:
        self._parser: StreamableParser | None = None  # created on the first token; see _process
        self._num_tokens = 0
        self._num_skipped = 0
        self._last_token: int | None = None
        self._open: _OpenMessage | None = None
        self._header: list[int] = []  # plain-text tokens of the header being read, not yet parsed
        self._after_end = False  # a message ended: only a <|start|> may follow
        self._channel_to_texts: dict[str, list[str]] = {c: [] for c in CHANNELS}
        self._tool_calls: list[tuple[str, list[str]]] = []  # (recipient, argument pieces)
        self._finished = False

    @property
    def num_skipped_tokens(self) -> int:
        """Tokens dropped because they broke the harmony grammar."""
        return self._num_skipped

    def feed(self, token_ids: int | Iterable[int]) -> list[StreamDelta]:
        """Consume one or more token ids; returns the deltas they complete, adjacent ones merged."""
        if self._finished:
            raise ValueError("StreamingParser.feed called after finish(); use a new parser")
        deltas: list[StreamDelta] = []
        for token in [token_ids] if isinstance(token_ids, int) else token_ids:
            self._process(token, deltas)
        return merge_deltas(deltas)

    def finish(self) -> list[StreamDelta]:
        """End of the completion: flushes a message cut off mid-content (e.g. by max_tokens)."""
        deltas: list[StreamDelta] = []
        if not self._finished and self._open is not None and self._parser is not None:
            try:
                self._parser.process_eos()
                self._close(deltas)
            except HarmonyError:  # malformed to the end: what was emitted stands, the rest is dropped
                self._num_skipped += 1
            self._open = None
        # A message cut off inside its header has no content yet, so there is nothing to flush (nor is
        # the header's held text parsed: harmony's parser raises on a header only at its special tokens).
        self._finished = True
        return merge_deltas(deltas)

    def result(self) -> ParsedCompletion:
        """Everything parsed so far (the whole completion once finish() was called)."""
        return ParsedCompletion(
            analysis="".join(self._channel_to_texts["analysis"]),
            commentary="".join(self._channel_to_texts["commentary"]),
            final="".join(self._channel_to_texts["final"]),
            tool_calls=tuple(
                ParsedToolCall(recipient, _tool_name(recipient), "".join(pieces))
                for recipient, pieces in self._tool_calls
            ),
            truncated=self._open is not None or self._last_token not in STOP_TOKEN_IDS,
        )

    def _process(self, token: int, deltas: list[StreamDelta]) -> None:
        is_first = self._num_tokens == 0
        self._num_tokens += 1
        self._last_token = token
        if self._after_end:
            if token != START_ID:
                self._num_skipped += 1
                return
            self._after_end = False  # the parser reads on into the next message (a new one costs ~150 us)
        if self._parser is None and not self._start_parser(token, is_first):
            self._num_skipped += 1
            return
        if self._open is None and token < STARTOFTEXT_ID:
            # Plain text inside a header waits for the header's next special token: the harmony parser
            # takes ~25 us per header token (~1 us per content token), and output that never ends its
            # header (random weights, a model gone astray) would pay that on every token.
            self._header.append(token)
            return
        if self._header and not self._feed_header() and not self._start_parser(token, False):
            self._num_skipped += 1
            return
        try:
            self._parser.process(token)
        except HarmonyError:
            # Malformed output: drop this message and resync at the next <|start|>.
            self._parser, self._open = None, None
            self._num_skipped += 1
            return
        if self._open is None:
            if token == MESSAGE_ID:  # header complete: the parser now knows channel and recipient
                self._open_message(deltas)
        elif token in MESSAGE_END_IDS:
            self._close(deltas)
            # Only a <|start|> may follow: what comes before it is skipped here, not held as if in a header
            # (it would be parsed, and found to break the grammar, only when the next one came).
            self._after_end = True
        else:
            self._emit(self._parser.last_content_delta or "", deltas)

    def _start_parser(self, token: int, is_first: bool) -> bool:
        """A parser for the message `token` starts, if it starts one (False: skip to the next <|start|>)."""
        if token == START_ID:
            self._parser = StreamableParser(get_encoding(), None)
        elif is_first:
            # The prompt ended with <|start|>assistant, so the completion starts in the header.
            self._parser = StreamableParser(get_encoding(), Role.ASSISTANT)
        else:
            return False
        return True

    def _feed_header(self) -> bool:
        """Feeds the held header tokens to the parser; False if they broke the grammar (the message is
        dropped, and they count as skipped from the one that broke it on, as if fed one by one)."""
        assert self._parser is not None
        header, self._header = self._header, []
        for i, token in enumerate(header):
            try:
                self._parser.process(token)
            except HarmonyError:
                self._parser, self._open = None, None
                self._num_skipped += len(header) - i
                return False
        return True

    def _open_message(self, deltas: list[StreamDelta]) -> None:
        assert self._parser is not None
        recipient = self._parser.current_recipient
        channel = self._parser.current_channel
        if recipient:
            self._tool_calls.append((recipient, []))
            index = len(self._tool_calls) - 1
            self._open = _OpenMessage("commentary", index)
            deltas.append(ToolCallStart(index, recipient, _tool_name(recipient)))
        else:
            # A missing or unknown channel is treated as the answer.
            self._open = _OpenMessage(channel if channel in CHANNELS else "final", None)

    def _close(self, deltas: list[StreamDelta]) -> None:
        assert self._parser is not None and self._open is not None
        # The parser flushes bytes held back for an unfinished UTF-8 character only at the end.
        content = self._parser.messages[-1].content[0]
        text = content.text if isinstance(content, TextContent) else ""
        self._emit(text[len("".join(self._open.emitted)) :], deltas)
        self._open = None

    def _emit(self, text: str, deltas: list[StreamDelta]) -> None:
        assert self._open is not None
        if not text:
            return
        self._open.emitted.append(text)
        if self._open.tool_index is not None:
            self._tool_calls[self._open.tool_index][1].append(text)
            deltas.append(ToolCallArgsDelta(self._open.tool_index, text))
        else:
            self._channel_to_texts[self._open.channel].append(text)
            deltas.append(TextDelta(self._open.channel, text))


def parse_completion(token_ids: Sequence[int]) -> ParsedCompletion:
    """Parse a whole completion; one cut off without a stop token parses as far as it goes."""
    parser = StreamingParser()
    parser.feed(token_ids)
    parser.finish()
    return parser.result()


def _tool_name(recipient: str) -> str:
    return recipient.removeprefix(_FUNCTIONS_PREFIX)


def merge_deltas(deltas: list[StreamDelta]) -> list[StreamDelta]:
    """Join adjacent text (or argument) deltas of the same message, for chunked feeding."""
    merged: list[StreamDelta] = []
    for d in deltas:
        prev = merged[-1] if merged else None
        if isinstance(d, TextDelta) and isinstance(prev, TextDelta) and prev.channel == d.channel:
            merged[-1] = TextDelta(d.channel, prev.text + d.text)
        elif isinstance(d, ToolCallArgsDelta) and isinstance(prev, ToolCallArgsDelta):
            if prev.index != d.index:
                merged.append(d)
            else:
                merged[-1] = ToolCallArgsDelta(d.index, prev.arguments + d.arguments)
        else:
            merged.append(d)
    return merged
