"""The gateway's choice assembly without Ray: harmony token streams -> events -> OpenAI / gRPC shapes.

These feed completions built with the real tokenizer (a random-weight model does not speak harmony);
tests/test_serve.py runs the same code behind real Serve deployments.
"""

from __future__ import annotations

import pytest
from openai_harmony import Message, Role

from engine.outputs import TokenLogprobs
from engine.sampling_params import SamplingParams
from gptoss.errors import InvalidRequestError
from gptoss.harmony import (
    ChatMessage,
    FunctionTool,
    TextDelta,
    ToolCallArgsDelta,
    ToolCallStart,
    tool_call_prefill,
)
from gptoss.tokenizer import CALL_ID, RETURN_ID, encode, get_encoding
from serve.admission import Generation, ToolChoice, render_chat
from serve.choices import ChoiceAssembler, ChoiceUsage, StopStrings
from serve.grpc_protocol import responses
from serve.model_protocol import ModelChunk
from serve.openai_protocol import ChatChoiceAccumulator, ChatDeltaBuilder, usage_body
from serve.proto.gptoss.v1 import gptoss_pb2 as pb

WEATHER = FunctionTool("get_weather", "Weather of a city", {"type": "object", "properties": {"city": {"type": "string"}}})


def assistant(channel: str, text: str, recipient: str | None = None, last: int | None = None) -> list[int]:
    """An assistant message as the model writes it after the prompt's `<|start|>assistant`... or a later one."""
    message = Message.from_role_and_content(Role.ASSISTANT, text).with_channel(channel)
    if recipient:
        message = message.with_recipient(recipient).with_content_type("<|constrain|>json")
    tokens = get_encoding().render(message)
    return tokens[:-1] + [last] if last is not None else tokens


def completion(*messages: list[int]) -> list[int]:
    """Messages joined as one completion: the first one's `<|start|>assistant` is already in the prompt."""
    return messages[0][2:] + [t for m in messages[1:] for t in m]


def chunks(tokens: list[int], finish: str, size: int = 3, logprobs: bool = False) -> list[ModelChunk]:
    out = []
    for start in range(0, len(tokens), size):
        part = tuple(tokens[start:start + size])
        lps = tuple(TokenLogprobs(t, -0.5, (t,), (-0.5,)) for t in part) if logprobs else None
        done = start + size >= len(tokens)
        out.append(ModelChunk(part, lps, finish if done else None, 10, start + len(part), 4))
    return out


def run(generation: Generation, model_chunks: list[ModelChunk]):
    assembler = ChoiceAssembler(0, generation)
    return [assembler.add(c) for c in model_chunks]


def generation(**kw) -> Generation:
    return Generation("req", (1, 2, 3), SamplingParams(), **kw)


def text_of(events, channel: str) -> str:
    return "".join(d.text for e in events for d in e.deltas if isinstance(d, TextDelta) and d.channel == channel)


def test_reasoning_then_answer_come_apart_by_channel_and_the_answer_ends_with_stop():
    tokens = completion(assistant("analysis", "The user greets me."), assistant("final", "Hello there!", last=RETURN_ID))
    events = run(generation(), chunks(tokens, "stop"))
    assert text_of(events, "analysis") == "The user greets me."
    assert text_of(events, "final") == "Hello there!"
    assert [e.finish_reason for e in events][-1] == "stop" and all(e.finish_reason is None for e in events[:-1])
    usage = events[-1].usage
    assert usage.num_output_tokens == len(tokens) and usage.num_reasoning_tokens > 0 and usage.num_cached_tokens == 4


def test_without_reasoning_only_the_answer_is_sent():
    tokens = completion(assistant("analysis", "Secret plan."), assistant("final", "Hi.", last=RETURN_ID))
    events = run(generation(include_reasoning=False), chunks(tokens, "stop"))
    assert text_of(events, "analysis") == "" and text_of(events, "final") == "Hi."


def test_a_tool_call_streams_its_start_then_its_arguments_and_finishes_with_tool_calls():
    tokens = completion(assistant("analysis", "Need weather."),
                        assistant("commentary", '{"city": "Paris"}', recipient="functions.get_weather", last=CALL_ID))
    events = run(generation(), chunks(tokens, "stop", size=2))
    deltas = [d for e in events for d in e.deltas]
    starts = [d for d in deltas if isinstance(d, ToolCallStart)]
    assert [(s.index, s.name) for s in starts] == [(0, "get_weather")]
    assert "".join(d.arguments for d in deltas if isinstance(d, ToolCallArgsDelta)) == '{"city": "Paris"}'
    assert deltas.index(starts[0]) < min(i for i, d in enumerate(deltas) if isinstance(d, ToolCallArgsDelta))
    assert events[-1].finish_reason == "tool_calls"


def test_a_forced_tool_call_parses_the_prefill_as_the_start_of_the_reply():
    # tool_choice named: the prompt ends with the call's header; the model writes only the arguments.
    prefill = tool_call_prefill("get_weather")
    events = run(generation(prefill_token_ids=tuple(prefill)), chunks(encode('{"city": "Oslo"}') + [CALL_ID], "stop"))
    body = ChatChoiceAccumulator(0, ChatDeltaBuilder(True), False)
    for e in events:
        body.add(e)
    message = body.body()["message"]
    assert message["content"] is None
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in message["tool_calls"]] == [
        ("get_weather", '{"city": "Oslo"}')]
    assert message["tool_calls"][0]["id"].startswith("call_") and body.finish_reason == "tool_calls"


def test_stop_strings_cut_the_answer_and_never_show_a_partial_match():
    tokens = completion(assistant("final", "one two three four", last=RETURN_ID))
    events = run(generation(stop=("three",)), chunks(tokens, "stop", size=1))
    assert text_of(events, "final") == "one two "
    assert events[-1].finish_reason == "stop"
    stops = StopStrings(("STOP",))
    assert stops.feed("abc ST") == ("abc ", False)  # "ST" could begin STOP: held back
    assert stops.feed("OPx") == ("", True)
    stops = StopStrings(("STOP",))
    assert stops.feed("abc ST") == ("abc ", False) and stops.feed("ART") == ("START", False)


def test_plain_text_is_decoded_across_characters_split_between_tokens():
    text = "héllo 🙂 日本語"
    tokens = encode(text)
    events = run(generation(harmony=False), chunks(tokens, "length", size=1, logprobs=True))
    assert text_of(events, "final") == text and events[-1].finish_reason == "length"
    assert sum(len(e.logprobs) for e in events) == len(tokens)  # every token's logprob, in plain text


def test_chat_logprobs_cover_the_answers_tokens_only():
    answer = assistant("final", "Yes", last=RETURN_ID)
    tokens = completion(assistant("analysis", "Think"), answer)
    events = run(generation(), chunks(tokens, "stop", logprobs=True))
    logged = [lp.token_id for e in events for lp in e.logprobs]
    assert logged == encode("Yes")


def test_openai_chat_deltas_announce_the_role_once_and_carry_reasoning_under_both_names():
    tokens = completion(assistant("analysis", "Hmm."), assistant("final", "Ok", last=RETURN_ID))
    events = run(generation(), chunks(tokens, "stop", size=len(tokens)))
    builder = ChatDeltaBuilder(include_reasoning=True)
    delta = builder.delta(events[0])
    assert delta == {"role": "assistant", "content": "Ok", "reasoning": "Hmm.", "reasoning_content": "Hmm."}
    assert "role" not in builder.delta(events[0])


def test_usage_counts_each_prompt_once_and_every_choices_tokens():
    usages = [ChoiceUsage(10, 5, 8, 2), ChoiceUsage(10, 7, 10, 0), ChoiceUsage(6, 1, 0, 0), ChoiceUsage(6, 2, 0, 1)]
    body = usage_body(usages, n=2)  # two prompts, two choices each
    assert body["prompt_tokens"] == 16 and body["completion_tokens"] == 15 and body["total_tokens"] == 31
    assert body["prompt_tokens_details"]["cached_tokens"] == 8
    assert body["completion_tokens_details"]["reasoning_tokens"] == 3


def test_grpc_messages_split_text_by_channel_and_end_with_finish_reason_and_usage():
    tokens = completion(assistant("analysis", "Why?"), assistant("final", "Because.", last=RETURN_ID))
    [event] = run(generation(), chunks(tokens, "stop", size=len(tokens)))
    messages = responses(event, "req")
    assert [(m.channel, m.text) for m in messages] == [(pb.CHANNEL_ANALYSIS, "Why?"), (pb.CHANNEL_FINAL, "Because.")]
    assert list(messages[0].token_ids) == tokens and not messages[1].token_ids
    assert messages[-1].finish_reason == pb.FINISH_REASON_STOP and messages[-1].usage.completion_tokens == len(tokens)
    assert messages[0].finish_reason == pb.FINISH_REASON_UNSPECIFIED


@pytest.mark.parametrize(("tools", "choice", "param"), [
    ([], ToolChoice("required"), "tool_choice"),
    ([WEATHER], ToolChoice("function", "get_time"), "tool_choice"),
    ([WEATHER, WEATHER], ToolChoice("auto"), "tools"),
], ids=["required-without-tools", "unknown-function", "duplicate-names"])
def test_tool_choices_that_cannot_be_honoured_are_refused_naming_the_field(tools, choice, param):
    with pytest.raises(InvalidRequestError) as info:
        render_chat([ChatMessage("user", "hi")], tools, choice, "medium")
    assert info.value.param == param


def test_tool_choice_none_hides_the_tools_and_required_forces_a_call():
    messages = [ChatMessage("user", "weather?")]
    with_tools, _ = render_chat(messages, [WEATHER], ToolChoice("auto"), "low")
    hidden, _ = render_chat(messages, [WEATHER], ToolChoice("none"), "low")
    forced, prefill = render_chat(messages, [WEATHER], ToolChoice("required"), "low")
    assert "get_weather" in get_encoding().decode(list(with_tools)) and "get_weather" not in get_encoding().decode(list(hidden))
    assert forced == with_tools + prefill and get_encoding().decode(list(prefill)) == " to=functions"
