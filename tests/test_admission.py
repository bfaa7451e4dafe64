"""Admission without Ray: every limit refused by name on both wire formats, checked before anything is
built in its size; the gRPC spelling of fields; JSON nesting; the linear stop-string matcher; the
admission workers that keep all of it off the gateway's event loop."""

from __future__ import annotations

import asyncio
import json
import random

import pytest

from engine.sampling_params import DEFAULT_STOP_TOKEN_IDS
from gptoss.errors import ClientError, InvalidRequestError, NotFoundError, PayloadTooLargeError
from serve.admission import (
    AdmissionContext,
    ChatInput,
    CompletionInput,
    ContextLengthError,
    MessageInput,
    ModelLimits,
    RequestLimits,
    SamplingInput,
    json_depth,
    parse_json,
    prepare_chat,
    prepare_completion,
)
from serve.admission_workers import AdmissionTimeoutError, AdmissionWorkers
from serve.choices import StopStrings
from serve.grpc_protocol import admit_generate
from serve.openai_protocol import admit_chat_json, admit_completion_json
from serve.proto.gptoss.v1 import gptoss_pb2 as pb

HUGE = 2**31


def context(**limits) -> AdmissionContext:
    return AdmissionContext(RequestLimits(**limits), "tiny-test", "req-1", "tenant-a", ModelLimits(1000, 201088),
                            "2026-12-06")


def chat_body(**fields) -> bytes:
    return json.dumps({"messages": [{"role": "user", "content": "hi"}]} | fields).encode()


def grpc_chat(**sampling) -> bytes:
    chat = pb.Chat(messages=[pb.ChatMessage(role="user", content="hi")])
    return pb.GenerateRequest(chat=chat, sampling=pb.SamplingParams(**sampling)).SerializeToString()


def refused(function, *args) -> ClientError:
    with pytest.raises(ClientError) as info:
        function(*args)
    return info.value


# (HTTP chat fields, gRPC sampling fields, the HTTP param, the gRPC param, the setting named)
LIMIT_CASES = [
    ({"n": HUGE}, {"n": HUGE}, "n", "sampling.n", "gateway.max_n"),
    ({"logprobs": True, "top_logprobs": HUGE}, {"logprobs": HUGE}, "top_logprobs", "sampling.logprobs",
     "engine.max_logprobs"),
    ({"stop": ["x"] * 17}, {"stop": ["x"] * 17}, "stop", "sampling.stop", "gateway.max_stop_strings"),
    ({"stop": "x" * 70_000}, {"stop": ["x" * 70_000]}, "stop", "sampling.stop", "gateway.max_stop_chars"),
    ({"max_tokens": 51}, {"max_tokens": 51}, "max_tokens", "sampling.max_tokens", "gateway.max_output_tokens"),
]


@pytest.mark.parametrize(("http", "grpc", "param", "grpc_param", "setting"), LIMIT_CASES,
                         ids=["n", "top_logprobs", "stop-count", "stop-length", "max-tokens"])
def test_each_limit_is_refused_by_name_on_http_and_on_grpc(http, grpc, param, grpc_param, setting):
    ctx = context(max_output_tokens=50)
    error = refused(admit_chat_json, chat_body(**http), ctx)
    assert error.param == param and str(error).startswith(param) and setting in str(error)
    error = refused(admit_generate, grpc_chat(**grpc), ctx)
    assert error.param == grpc_param and str(error).startswith(grpc_param) and setting in str(error)


def test_an_error_quotes_a_huge_value_cut_short():
    error = refused(admit_chat_json, chat_body(reasoning_effort="x" * 70_000), context())
    assert error.param == "reasoning_effort" and len(str(error)) < 500


@pytest.mark.parametrize(("field", "count", "param", "setting"), [
    ("messages", 2049, "messages", "gateway.max_messages"),
    ("tools", 129, "tools", "gateway.max_tools"),
], ids=["messages", "tools"])
def test_counts_of_messages_and_tools_are_capped_on_both_apis(field, count, param, setting):
    tool = {"type": "function", "function": {"name": "f"}}
    entries = [{"role": "user", "content": "hi"}] * count if field == "messages" else [tool] * count
    error = refused(admit_chat_json, chat_body(**{field: entries}), context())
    assert error.param == param and setting in str(error)
    chat = pb.Chat(messages=[pb.ChatMessage(role="user", content="hi")] * (count if field == "messages" else 1),
                   tools=[pb.Tool(name="f")] * (count if field == "tools" else 0))
    error = refused(admit_generate, pb.GenerateRequest(chat=chat).SerializeToString(), context())
    assert error.param == f"chat.{param}" and setting in str(error)


def test_completions_cap_their_prompts_and_each_becomes_one_generation():
    body = json.dumps({"prompt": [[1, 2]] * 129}).encode()
    assert refused(admit_completion_json, body, context()).param == "prompt"
    generations, options = admit_completion_json(json.dumps({"prompt": [[1, 2], [3, 4]], "n": 2}).encode(),
                                                 context())
    assert [g.request_id for g in generations] == ["req-1-0", "req-1-1"] and all(g.n == 2 for g in generations)
    assert generations[0].prompt_token_ids == (1, 2) and not generations[0].harmony
    assert generations[0].sampling.stop_token_ids == () and generations[0].cache_salt == "tenant-a"


@pytest.mark.parametrize(("schema", "words"), [
    ({"type": "object", "description": "x" * 70_000}, "gateway.max_tool_schema_bytes"),
    (json.loads("[" * 100 + "]" * 100), "gateway.max_json_depth"),
    ([1, 2], "JSON object"),
], ids=["too-big", "too-deep", "not-an-object"])
def test_a_tool_schema_is_bounded_in_size_and_depth_on_both_apis(schema, words):
    tools = [{"type": "function", "function": {"name": "f", "parameters": schema}}]
    if isinstance(schema, dict):
        error = refused(admit_chat_json, chat_body(tools=tools), context())
        assert error.param == "tools.0.function.parameters" and words in str(error)
    chat = pb.Chat(messages=[pb.ChatMessage(role="user", content="hi")],
                   tools=[pb.Tool(name="f", parameters_json=json.dumps(schema))])
    error = refused(admit_generate, pb.GenerateRequest(chat=chat).SerializeToString(), context())
    assert error.param == "chat.tools[0].parameters_json" and words in str(error)


def test_a_body_nested_past_the_limit_is_a_client_error_not_a_recursion_error():
    for depth in (65, 100_000):
        error = refused(admit_chat_json, b"[" * depth + b"]" * depth, context())
        assert error.param == "body" and "nested deeper" in str(error)
    assert json_depth(json.loads("[[[]], {}]"), 64) == 3 and json_depth(5, 64) == 0


def test_malformed_and_oversized_grpc_messages_are_refused_before_they_are_parsed():
    error = refused(admit_generate, bytes([0x22, 0x05, 0xFF]), context())
    assert isinstance(error, InvalidRequestError) and "malformed" in str(error)
    error = refused(admit_generate, grpc_chat(), context(max_request_bytes=10))
    assert isinstance(error, PayloadTooLargeError) and "gateway.max_request_bytes" in str(error)


@pytest.mark.parametrize(("prompt_len", "max_tokens", "param", "words"), [
    (101, 10, "prompt", "gateway.max_prompt_tokens"),
    (10, 51, "max_tokens", "gateway.max_output_tokens"),
    (990, 20, "max_tokens", "at most 10"),
    (1000, None, "prompt", "maximum context length is 1000"),
], ids=["prompt-over-gateway-limit", "output-over-gateway-limit", "past-the-context", "prompt-fills-the-context"])
def test_prompts_and_outputs_past_the_limits_are_refused_naming_them(prompt_len, max_tokens, param, words):
    limits = {"max_prompt_tokens": 100, "max_output_tokens": 50} if prompt_len < 900 else {}
    request = CompletionInput(None, ((5,) * prompt_len,), SamplingInput(max_tokens=max_tokens))
    error = refused(prepare_completion, request, context(**limits))
    assert error.param == param and words in str(error)


def test_without_max_tokens_the_output_is_capped_at_the_limit_or_the_context():
    ctx = context(max_output_tokens=50)
    [capped] = prepare_completion(CompletionInput(None, ((5,) * 980,)), ctx)
    assert capped.sampling.max_tokens == 20  # the context's room is less than the limit
    [capped] = prepare_completion(CompletionInput(None, ((5,) * 10,)), ctx)
    assert capped.sampling.max_tokens == 50


def test_a_prompt_past_the_context_is_context_length_exceeded_and_token_ids_must_be_in_the_vocabulary():
    assert isinstance(refused(prepare_completion, CompletionInput(None, ((1,) * 1000,)), context()),
                      ContextLengthError)
    error = refused(admit_generate, pb.GenerateRequest(token_ids=pb.TokenIds(ids=[201088])).SerializeToString(),
                    context())
    assert error.param == "token_ids" and "[0, 201088)" in str(error)


def test_another_model_is_not_found_and_grpc_keeps_harmonys_stop_tokens():
    assert isinstance(refused(admit_chat_json, chat_body(model="gpt-4"), context()), NotFoundError)
    generation = admit_generate(pb.GenerateRequest(text="hello", request_id="mine").SerializeToString(), context())
    assert generation.request_id == "mine" and generation.sampling.stop_token_ids == DEFAULT_STOP_TOKEN_IDS


def test_grpc_names_chat_fields_as_the_proto_spells_them():
    chat = pb.Chat(messages=[pb.ChatMessage(role="user", content="x"), pb.ChatMessage(role="robot", content="x")])
    error = refused(admit_generate, pb.GenerateRequest(chat=chat).SerializeToString(), context())
    assert error.param == "chat.messages[1]" and str(error).startswith("chat.messages[1]: role")
    chat = pb.Chat(messages=[pb.ChatMessage(role="user", content="x")], tools=[pb.Tool(name="bad name")])
    error = refused(admit_generate, pb.GenerateRequest(chat=chat).SerializeToString(), context())
    assert error.param == "chat.tools[0].name"


def test_a_chat_becomes_one_generation_with_the_tenant_and_the_request_id():
    chat = ChatInput("tiny-test", (MessageInput("user", "hello"),), SamplingInput(n=2, stop=("a", "")))
    generation = prepare_chat(chat, context())
    assert generation.request_id == "req-1" and generation.cache_salt == "tenant-a" and generation.harmony
    assert generation.n == 2 and generation.stop == ("a",)  # an empty stop string stops nothing


def test_a_word_that_overflows_the_tokenizers_stack_is_a_client_error_on_both_inputs():
    word = "x" * 1_100_000  # harmony's regex overflows its stack (a Rust panic) on a word this long
    error = refused(prepare_chat, ChatInput(None, (MessageInput("user", word),)), context(max_json_depth=64))
    assert error.param == "messages" and "cannot be tokenized" in str(error)
    assert refused(prepare_completion, CompletionInput(None, (word,)), context()).param == "prompt"


def test_parse_json_names_the_field_and_refuses_bad_utf8():
    assert parse_json(b'{"a": 1}', "body", 64) == {"a": 1}
    assert "UTF-8" in str(refused(parse_json, b"\xff", "body", 64))


# --- stop strings --------------------------------------------------------------------------------------

def naive_stop(text: str, stops: tuple[str, ...]) -> str | None:
    """The text before the first stop string to complete (earliest end; the longest at one end), or
    None when none occurs."""
    for end in range(1, len(text) + 1):
        hits = [s for s in stops if s and text[:end].endswith(s)]
        if hits:
            return text[: end - max(map(len, hits))]
    return None


def test_stop_strings_cut_a_stream_where_a_rescan_of_the_whole_text_would():
    rng = random.Random(0)
    for _ in range(300):
        text = "".join(rng.choice("ab c") for _ in range(rng.randrange(0, 40)))
        stops = tuple("".join(rng.choice("abc") for _ in range(rng.randrange(1, 5))) for _ in range(rng.randrange(1, 4)))
        matcher, emitted, hit, at = StopStrings(stops), [], False, 0
        while at < len(text) and not hit:
            size = rng.randrange(1, 5)
            out, hit = matcher.feed(text[at:at + size])
            emitted.append(out)
            at += size
        if not hit:
            emitted.append(matcher.flush())
        expected = naive_stop(text, stops)
        assert ("".join(emitted), hit) == ((expected, True) if expected is not None else (text, False)), (text, stops)


def test_a_long_stop_string_is_matched_across_many_pieces_and_only_its_prefix_is_held():
    stop = "ab" * 35_000
    matcher = StopStrings((stop,))
    out, hit = matcher.feed("xx" + "ab" * 20_000)
    assert out == "xx" and not hit  # 40,000 characters that may begin the stop string are held
    out, hit = matcher.feed("ab" * 15_000)
    assert out == "" and hit


# --- admission workers ---------------------------------------------------------------------------------

def test_workers_admit_off_the_loop_refuse_by_name_and_replace_a_worker_past_the_timeout():
    async def scenario():
        workers = AdmissionWorkers(1, timeout_s=3.0)
        try:
            generation, options = await workers.run(admit_chat_json, chat_body(stream=True), context())
            error = None
            try:
                await workers.run(admit_chat_json, chat_body(n=HUGE), context())
            except ClientError as e:
                error = e
            # A run of 300,000 letters: harmony's tokenizer takes far longer than 3 s (quadratic).
            slow = chat_body(messages=[{"role": "user", "content": "x" * 300_000}])
            started = asyncio.get_running_loop().time()
            with pytest.raises(AdmissionTimeoutError):
                await workers.run(admit_chat_json, slow, context())
            waited = asyncio.get_running_loop().time() - started
            again, _ = await workers.run(admit_chat_json, chat_body(), context())
            return generation, options, error, waited, again
        finally:
            workers.close()

    generation, options, error, waited, again = asyncio.run(scenario())
    assert generation.request_id == "req-1" and options.stream
    assert error.param == "n" and "gateway.max_n" in str(error)
    assert waited < 30
    assert again.prompt_token_ids == generation.prompt_token_ids  # a new worker serves the next request
