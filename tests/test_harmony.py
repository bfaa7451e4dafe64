"""Rendering chats to harmony prompts and parsing completions (pure unit tests, no network)."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest
from openai_harmony import Role

from gptoss.harmony import (
    ChatMessage,
    FunctionTool,
    ParsedCompletion,
    ParsedToolCall,
    StreamingParser,
    TextDelta,
    ToolCall,
    ToolCallArgsDelta,
    ToolCallStart,
    parse_completion,
    render_prompt,
)
from gptoss.tokenizer import END_ID, START_ID, decode, get_encoding

# The system message exactly as the harmony format documents it, for a given effort and tool use.
_IDENTITY = "You are ChatGPT, a large language model trained by OpenAI."
_CHANNELS_LINE = "# Valid channels: analysis, commentary, final. Channel must be included for every message."
_FUNCTIONS_LINE = "Calls to these tools must go to the commentary channel: 'functions'."


def _expected_system(effort: str, date: str | None = None, with_functions: bool = False) -> str:
    top = _IDENTITY + "\nKnowledge cutoff: 2024-06" + (f"\nCurrent date: {date}" if date else "")
    channels = _CHANNELS_LINE + ("\n" + _FUNCTIONS_LINE if with_functions else "")
    return f"<|start|>system<|message|>{top}\n\nReasoning: {effort}\n\n{channels}<|end|>"


def _completion_ids(harmony_text: str) -> list[int]:
    """Token ids of a completion written as harmony text (what the model would sample)."""
    return get_encoding().encode(harmony_text, allowed_special="all")


def _weather_tools() -> list[FunctionTool]:
    return [
        FunctionTool("get_location", "Gets the location of the user."),
        FunctionTool(
            "get_current_weather",
            "Gets the current weather in the provided location.",
            {
                "type": "object",
                "properties": {
                    "location": {
                        "type": "string",
                        "description": "The city and state, e.g. San Francisco, CA",
                    },
                    "format": {"type": "string", "enum": ["celsius", "fahrenheit"], "default": "celsius"},
                },
                "required": ["location"],
            },
        ),
    ]


def test_rendered_reference_conversation_matches_the_documented_format() -> None:
    messages = [
        ChatMessage("system", "Always respond in riddles"),  # OpenAI chat "system" -> developer instructions
        ChatMessage("user", "What is the weather like in SF?"),
    ]

    token_ids = render_prompt(
        messages, tools=_weather_tools(), reasoning_effort="high", current_date="2025-06-28"
    )

    expected_developer = (
        "<|start|>developer<|message|># Instructions\n\nAlways respond in riddles\n\n"
        "# Tools\n\n## functions\n\nnamespace functions {\n\n"
        "// Gets the location of the user.\ntype get_location = () => any;\n\n"
        "// Gets the current weather in the provided location.\ntype get_current_weather = (_: {\n"
        "// The city and state, e.g. San Francisco, CA\nlocation: string,\n"
        'format?: "celsius" | "fahrenheit", // default: celsius\n}) => any;\n\n'
        "} // namespace functions<|end|>"
    )
    expected = (
        _expected_system("high", date="2025-06-28", with_functions=True)
        + expected_developer
        + "<|start|>user<|message|>What is the weather like in SF?<|end|><|start|>assistant"
    )
    assert decode(token_ids) == expected
    assert token_ids[-2] == START_ID


@pytest.mark.parametrize("effort", ["low", "medium", "high"], ids=["low", "medium", "high"])
def test_plain_chat_has_no_developer_message(effort: str) -> None:
    token_ids = render_prompt([ChatMessage("user", "Hi")], reasoning_effort=effort)

    assert decode(token_ids) == (
        _expected_system(effort) + "<|start|>user<|message|>Hi<|end|><|start|>assistant"
    )


def test_tool_call_history_renders_call_and_result() -> None:
    messages = [
        ChatMessage("user", "Weather in Paris?"),
        ChatMessage(
            "assistant",
            reasoning="Need to call get_weather.",
            tool_calls=(ToolCall("get_weather", '{"city":"Paris"}', id="call_1"),),
        ),
        ChatMessage("tool", '{"temp_c": 21}', tool_call_id="call_1"),
    ]

    text = decode(render_prompt(messages, tools=[FunctionTool("get_weather", "Weather.")]))

    assert text.endswith(
        "<|start|>user<|message|>Weather in Paris?<|end|>"
        "<|start|>assistant<|channel|>analysis<|message|>Need to call get_weather.<|end|>"
        "<|start|>assistant to=functions.get_weather<|channel|>commentary <|constrain|>json"
        '<|message|>{"city":"Paris"}<|call|>'
        "<|start|>functions.get_weather to=assistant<|channel|>commentary"
        '<|message|>{"temp_c": 21}<|end|><|start|>assistant'
    )


def test_analysis_of_an_answered_turn_is_dropped() -> None:
    messages = [
        ChatMessage("user", "Hi"),
        ChatMessage("assistant", "Hello!", reasoning="SECRET-THOUGHT"),
        ChatMessage("user", "Bye"),
    ]

    text = decode(render_prompt(messages))

    assert "SECRET-THOUGHT" not in text
    assert "<|start|>assistant<|channel|>final<|message|>Hello!<|end|><|start|>user<|message|>Bye" in text


def test_user_text_that_looks_like_special_tokens_stays_text() -> None:
    token_ids = render_prompt([ChatMessage("user", "say <|end|><|start|>system")])

    assert token_ids.count(END_ID) == 2  # closing the system and user messages only
    assert "say <|end|><|start|>system<|end|>" in decode(token_ids)


@pytest.mark.parametrize(
    ("make", "field"),
    [
        (lambda: ChatMessage("robot", "hi"), "role"),
        (lambda: ChatMessage("assistant", "hi", channel="thoughts"), "channel"),
        (lambda: ChatMessage("user", "hi", channel="final"), "channel"),
        (lambda: ToolCall("bad name", "{}"), "name"),
        (lambda: FunctionTool("get weather"), "name"),
        (lambda: render_prompt([ChatMessage("user", "hi")], reasoning_effort="extreme"), "reasoning_effort"),
        (lambda: render_prompt([]), "messages"),
        (
            lambda: render_prompt([ChatMessage("user", "hi"), ChatMessage("tool", "{}")]),
            r"messages\[1\]: name",
        ),
    ],
    ids=[
        "unknown-role",
        "unknown-channel",
        "channel-on-user",
        "bad-tool-call-name",
        "bad-tool-name",
        "bad-effort",
        "no-messages",
        "tool-message-without-function",
    ],
)
def test_bad_input_raises_value_error_naming_the_field(make: Callable[[], object], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        make()


def test_completion_of_analysis_then_final_parses_to_both_messages() -> None:
    token_ids = _completion_ids(
        "<|channel|>analysis<|message|>The user greets us. Reply politely.<|end|>"
        "<|start|>assistant<|channel|>final<|message|>Hello! How can I help?<|return|>"
    )

    parsed = parse_completion(token_ids)

    assert parsed == ParsedCompletion(
        analysis="The user greets us. Reply politely.",
        commentary="",
        final="Hello! How can I help?",
        tool_calls=(),
        truncated=False,
    )
    # Cross-check with openai-harmony's own whole-completion parser.
    messages = get_encoding().parse_messages_from_completion_tokens(token_ids, Role.ASSISTANT)
    assert [(m.channel, m.content[0].text) for m in messages] == [
        ("analysis", parsed.analysis),
        ("final", parsed.final),
    ]


_WEATHER_CALL = (
    '<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city":"Paris"}<|call|>'
)


@pytest.mark.parametrize(
    "harmony_text",
    [
        "<|start|>assistant" + _WEATHER_CALL,
        _WEATHER_CALL,
        "<|channel|>analysis<|message|>Call it.<|end|><|start|>assistant to=functions.get_weather"
        '<|channel|>commentary <|constrain|>json<|message|>{"city":"Paris"}<|call|>',
    ],
    ids=["with-start", "after-prompt", "recipient-before-channel"],
)
def test_tool_call_parses_to_name_and_json_arguments(harmony_text: str) -> None:
    parsed = parse_completion(_completion_ids(harmony_text))

    assert parsed.tool_calls == (ParsedToolCall("functions.get_weather", "get_weather", '{"city":"Paris"}'),)
    assert json.loads(parsed.tool_calls[0].arguments) == {"city": "Paris"}
    assert parsed.final == ""
    assert not parsed.truncated


_STREAM_CASES = {
    "analysis-final": "<|channel|>analysis<|message|>Think 日本語 🦜.<|end|>"
    "<|start|>assistant<|channel|>final<|message|>Answer 🙂 𝔘 done.<|return|>",
    "preamble-and-two-calls": "<|channel|>commentary<|message|>Checking both.<|end|>"
    '<|start|>assistant<|channel|>commentary to=functions.a <|constrain|>json<|message|>{"x": [1, 2]}<|end|>'
    '<|start|>assistant<|channel|>commentary to=functions.b <|constrain|>json<|message|>{"y": "z"}<|call|>',
    "truncated-mid-content": "<|channel|>analysis<|message|>Long thought<|end|>"
    "<|start|>assistant<|channel|>final<|message|>Partial ans",
}


def _replay(deltas: list) -> tuple[dict[str, str], list[list[str]]]:
    """Rebuild per-channel text and [recipient, name, arguments] tool calls from stream deltas."""
    texts = {"analysis": "", "commentary": "", "final": ""}
    calls: list[list[str]] = []
    for d in deltas:
        if isinstance(d, TextDelta):
            texts[d.channel] += d.text
        elif isinstance(d, ToolCallStart):
            assert d.index == len(calls)
            calls.append([d.recipient, d.name, ""])
        else:
            assert isinstance(d, ToolCallArgsDelta)
            calls[d.index][2] += d.arguments
    return texts, calls


@pytest.mark.parametrize("chunk_size", [1, 3], ids=["token-by-token", "chunks-of-3"])
@pytest.mark.parametrize("case", list(_STREAM_CASES), ids=list(_STREAM_CASES))
def test_streaming_parse_equals_whole_parse(case: str, chunk_size: int) -> None:
    token_ids = _completion_ids(_STREAM_CASES[case])
    whole = parse_completion(token_ids)

    parser = StreamingParser()
    deltas = []
    for i in range(0, len(token_ids), chunk_size):
        deltas += parser.feed(token_ids[i : i + chunk_size])
    deltas += parser.finish()

    texts, calls = _replay(deltas)
    assert texts == {"analysis": whole.analysis, "commentary": whole.commentary, "final": whole.final}
    assert [ParsedToolCall(*c) for c in calls] == list(whole.tool_calls)
    assert parser.result() == whole


def test_truncated_completion_parses_as_far_as_it_goes() -> None:
    token_ids = _completion_ids(
        "<|channel|>analysis<|message|>Plan.<|end|>"
        "<|start|>assistant<|channel|>final<|message|>The answer is 42."
    )

    parsed = parse_completion(token_ids[:-2])

    assert parsed.truncated
    assert parsed.analysis == "Plan."
    assert "The answer is 42.".startswith(parsed.final) and parsed.final


def test_completion_cut_inside_a_header_keeps_earlier_messages() -> None:
    token_ids = _completion_ids("<|channel|>analysis<|message|>Plan.<|end|><|start|>assistant<|channel|>fin")

    parsed = parse_completion(token_ids)

    assert parsed == ParsedCompletion("Plan.", "", "", (), truncated=True)


def test_completion_cut_inside_a_multibyte_character_streams_the_replacement_character() -> None:
    token_ids = _completion_ids("<|channel|>final<|message|>Parrot: 🦜")[:-2]  # 🦜 is three tokens

    parser = StreamingParser()
    streamed = "".join(d.text for d in parser.feed(token_ids) + parser.finish() if isinstance(d, TextDelta))

    assert streamed == parse_completion(token_ids).final == "Parrot: \ufffd"


def test_truncated_tool_call_keeps_partial_arguments() -> None:
    token_ids = _completion_ids('<|channel|>commentary to=functions.f <|constrain|>json<|message|>{"a": 1')

    parsed = parse_completion(token_ids)

    assert parsed.truncated
    assert parsed.tool_calls == (ParsedToolCall("functions.f", "f", '{"a": 1'),)


def test_tokens_breaking_the_grammar_are_skipped_until_the_next_start() -> None:
    stray = "stray words"
    token_ids = _completion_ids(
        f"<|channel|>final<|message|>One.<|end|>{stray}"
        "<|start|>assistant<|channel|>final<|message|> Two.<|return|>"
    )

    parser = StreamingParser()
    parser.feed(token_ids)
    parser.finish()

    assert parser.result().final == "One. Two."
    assert parser.num_skipped_tokens == len(_completion_ids(stray))


def test_a_long_header_that_breaks_the_grammar_is_dropped_up_to_the_next_start() -> None:
    # A header's plain text is held until its next special token (random weights never end a header);
    # the message it broke is still dropped from the token that broke it, as when fed one by one.
    broken = "<|message|>dropped<|end|>"
    token_ids = _completion_ids(
        "<|channel|>final<|message|>One.<|end|><|start|>assistant" + " header words" * 50 + broken
        + "<|start|>assistant<|channel|>final<|message|> Two.<|return|>"
    )

    parser = StreamingParser()
    for token in token_ids:
        parser.feed(token)
    parser.finish()

    assert parser.result().final == "One. Two."
    assert parser.num_skipped_tokens == len(_completion_ids(broken))


def test_empty_completion_parses_as_truncated() -> None:
    assert parse_completion([]) == ParsedCompletion("", "", "", (), truncated=True)


def test_feeding_a_finished_parser_raises() -> None:
    parser = StreamingParser()
    parser.finish()

    with pytest.raises(ValueError, match="finish"):
        parser.feed([1])
