"""Bad input never crashes the server or disturbs other requests: each malformed HTTP body and gRPC message
gets a 4xx / INVALID_ARGUMENT (NOT_FOUND for an unknown model) that names the problem, while a good
streaming request runs alongside and finishes with the bare engine's tokens."""

from __future__ import annotations

import json
import threading

import grpc
import pytest
import requests
import torch

import gptoss
from engine import Engine, EngineConfig, SamplingParams
from gptoss.tokenizer import decode
from serve.proto.gptoss.v1 import gptoss_pb2 as pb
from serve.proto.gptoss.v1 import gptoss_pb2_grpc as pb_grpc

CHAT = {"model": "tiny-test", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
COMPLETION = {"model": "tiny-test", "prompt": [1, 2, 3], "max_tokens": 4}
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}

# (field, bad value, what the error must name) for both endpoints' shared sampling fields.
SAMPLING_CASES = [
    ("temperature", -1, "temperature"), ("temperature", 2.5, "temperature"), ("temperature", "hot", "temperature"),
    ("temperature", None, "temperature"), ("temperature", True, "temperature"), ("temperature", [1], "temperature"),
    ("top_p", 0, "top_p"), ("top_p", -0.1, "top_p"), ("top_p", 1.5, "top_p"), ("top_p", "x", "top_p"),
    ("top_k", -1, "top_k"), ("top_k", 1.5, "top_k"), ("top_k", "5", "top_k"),
    ("min_p", -0.1, "min_p"), ("min_p", 1.5, "min_p"),
    ("n", 0, "n"), ("n", -1, "n"), ("n", 100, "n"), ("n", "2", "n"), ("n", 2.5, "n"),
    ("seed", -1, "seed"), ("seed", 2**64, "seed"), ("seed", "7", "seed"), ("seed", 1.5, "seed"),
    ("max_tokens", 0, "max_tokens"), ("max_tokens", -5, "max_tokens"), ("max_tokens", "4", "max_tokens"),
    ("max_tokens", 1.5, "max_tokens"), ("max_tokens", 5000, "max_tokens"),
    ("stop", 5, "stop"), ("stop", [1, 2], "stop"), ("stop", ["a"] * 20, "stop"), ("stop", {"a": 1}, "stop"),
    ("presence_penalty", 3, "presence_penalty"), ("presence_penalty", -3, "presence_penalty"),
    ("presence_penalty", "x", "presence_penalty"), ("frequency_penalty", 2.5, "frequency_penalty"),
    ("frequency_penalty", -2.5, "frequency_penalty"), ("stream", "yes", "stream"), ("stream", 1, "stream"),
    ("stream_options", 5, "stream_options"), ("stream_options", {"include_usage": "x"}, "stream_options"),
    ("stream_options", {"foo": 1}, "stream_options"), ("logit_bias", {"5": 10}, "logit_bias"),
    ("timeout", 0, "timeout"), ("timeout", -1, "timeout"), ("timeout", "x", "timeout"),
    ("foo", 1, "foo"), ("repetition_penalty", 1.1, "repetition_penalty"), ("model", 5, "model"),
    ("user", 5, "user"),
]

CHAT_CASES = [
    ("messages", None, "messages"), ("messages", "hi", "messages"), ("messages", 5, "messages"),
    ("messages", [], "messages"), ("messages", [5], "messages"), ("messages", [{}], "messages"),
    ("messages", [{"role": "robot", "content": "x"}], "role"), ("messages", [{"role": "", "content": "x"}], "role"),
    ("messages", [{"role": "user", "content": 5}], "content"),
    ("messages", [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], "content"),
    ("messages", [{"role": "user", "content": [{"type": "text"}]}], "content"),
    ("messages", [{"role": "user", "content": "x", "extra": 1}], "extra"),
    ("messages", [{"role": "tool", "content": "x"}], "messages"),
    ("messages", [{"role": "tool", "content": "x", "tool_call_id": "nope"}], "messages"),
    ("messages", [{"role": "assistant", "tool_calls": [{"function": {"name": "bad name!", "arguments": "{}"}}]}],
     "messages"),
    ("messages", [{"role": "assistant", "content": "x", "tool_calls": "nope"}], "tool_calls"),
    ("messages", [{"role": "user", "content": "x", "tool_calls": [{"function": {"name": "f"}}]}], "messages"),
    ("messages", [{"role": "user", "content": "x", "reasoning": "y"}], "messages"),
    ("messages", [{"role": "user", "content": "x", "name": 5}], "name"),
    ("max_completion_tokens", 0, "max_completion_tokens"), ("max_completion_tokens", "4", "max_completion_tokens"),
    ("logprobs", "x", "logprobs"), ("logprobs", 5, "logprobs"),
    ("top_logprobs", -1, "top_logprobs"), ("top_logprobs", 100, "top_logprobs"),
    ("tools", "x", "tools"), ("tools", [5], "tools"), ("tools", [{"type": "function"}], "tools"),
    ("tools", [{"type": "function", "function": {"name": "bad name!"}}], "tools"),
    ("tools", [{"type": "retrieval"}], "tools"), ("tools", [WEATHER, WEATHER], "tools"),
    ("tools", [{"type": "function", "function": {"name": "f", "parameters": "x"}}], "tools"),
    ("tool_choice", "sometimes", "tool_choice"), ("tool_choice", 5, "tool_choice"),
    ("tool_choice", "required", "tool_choice"), ("tool_choice", {"type": "function"}, "tool_choice"),
    ("reasoning_effort", "extreme", "reasoning_effort"), ("reasoning_effort", 5, "reasoning_effort"),
    ("include_reasoning", "x", "include_reasoning"), ("response_format", {"type": "json_object"}, "response_format"),
    ("audio", {"voice": "x"}, "audio"), ("modalities", ["audio"], "modalities"), ("prediction", {"a": 1}, "prediction"),
    ("parallel_tool_calls", "x", "parallel_tool_calls"), ("metadata", 5, "metadata"),
]

COMPLETION_CASES = [
    ("prompt", None, "prompt"), ("prompt", [], "prompt"), ("prompt", [[]], "prompt"), ("prompt", [1, "a"], "prompt"),
    ("prompt", [-1], "prompt"), ("prompt", [201088], "prompt"), ("prompt", [2**40], "prompt"), ("prompt", "", "prompt"),
    ("prompt", 5, "prompt"), ("prompt", {"a": 1}, "prompt"), ("prompt", [[1], ["a"]], "prompt"),
    ("prompt", [1.5], "prompt"), ("prompt", [True], "prompt"), ("prompt", [5] * 3000, "prompt"),
    ("echo", True, "echo"), ("suffix", "x", "suffix"), ("best_of", 3, "best_of"), ("logprobs", -1, "logprobs"),
    ("logprobs", 100, "logprobs"), ("logprobs", "x", "logprobs"),
]

RAW_BODIES = [
    (b"{", 400, "JSON"), (b"\xff\xfe{}", 400, "UTF-8"), (b"[]", 400, "object"), (b"5", 400, "object"),
    (b'"str"', 400, "object"), (b"", 400, "JSON"), (b"null", 400, "object"),
    (b'{"model": "tiny-test", "messages": [{"role": "user", "content": "x"}], "temperature": NaN}', 400, "temperature"),
    (b'{"model": "tiny-test", "messages": [{"role": "user", "content": "x"}], "top_p": Infinity}', 400, "top_p"),
    (b'{"model": "tiny-test", "messages": [{"role": "user", "content": "\xc3\x28"}]}', 400, "UTF-8"),
]


def http_cases():
    cases = []
    for field, value, names in SAMPLING_CASES:
        cases.append(("chat", CHAT | {field: value}, 400, names))
        cases.append(("completions", COMPLETION | {field: value}, 400, names))
    cases += [("chat", CHAT | {field: value}, 400, names) for field, value, names in CHAT_CASES]
    cases += [("completions", COMPLETION | {field: value}, 400, names) for field, value, names in COMPLETION_CASES]
    cases += [("chat", CHAT | {"model": "gpt-4"}, 404, "tiny-test"), ("completions", COMPLETION | {"model": "x"}, 404, "model")]
    cases.append(("chat", CHAT | {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "f"}}},
                  400, "tool_choice"))
    cases.append(("chat", CHAT | {"messages": [{"role": "user", "content": "word " * 3000}]}, 400, "context length"))
    cases.append(("chat", CHAT | {"messages": [{"role": "user", "content": "x" * (2 << 20)}]}, 413, "bytes"))
    return cases


def grpc_cases():
    chat = pb.Chat(messages=[pb.ChatMessage(role="user", content="hi")])
    inputs = {"token_ids": dict(token_ids=pb.TokenIds(ids=[1, 2, 3])), "text": dict(text="hi"), "chat": dict(chat=chat)}
    bad_sampling = [
        (dict(temperature=-1), "temperature"), (dict(temperature=float("nan")), "temperature"),
        (dict(temperature=float("inf")), "temperature"), (dict(top_p=0), "top_p"), (dict(top_p=-1), "top_p"),
        (dict(top_p=2), "top_p"), (dict(top_p=float("nan")), "top_p"), (dict(min_p=-0.5), "min_p"),
        (dict(min_p=2), "min_p"), (dict(presence_penalty=5), "presence_penalty"),
        (dict(presence_penalty=-5), "presence_penalty"), (dict(frequency_penalty=3), "frequency_penalty"),
        (dict(frequency_penalty=float("nan")), "frequency_penalty"), (dict(max_tokens=0), "max_tokens"),
        (dict(max_tokens=5000), "max_tokens"), (dict(seed=2**63), "seed"), (dict(seed=2**64 - 1), "seed"),
        (dict(logprobs=1000), "logprobs"), (dict(n=0), "n"), (dict(n=100), "n"),
    ]
    cases = [(pb.GenerateRequest(sampling=pb.SamplingParams(**s), **inp), grpc.StatusCode.INVALID_ARGUMENT, names)
             for inp in inputs.values() for s, names in bad_sampling]

    def chat_case(names, **kw):
        return (pb.GenerateRequest(chat=pb.Chat(**kw)), grpc.StatusCode.INVALID_ARGUMENT, names)

    def msg(**kw):
        return [pb.ChatMessage(**kw)]

    tool = pb.Tool(name="get_weather", parameters_json='{"type": "object"}')
    cases += [
        (pb.GenerateRequest(), grpc.StatusCode.INVALID_ARGUMENT, "input"),
        (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[])), grpc.StatusCode.INVALID_ARGUMENT, "token_ids"),
        (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[201088])), grpc.StatusCode.INVALID_ARGUMENT, "token_ids"),
        (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[2**31])), grpc.StatusCode.INVALID_ARGUMENT, "token_ids"),
        (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[2**32 - 1])), grpc.StatusCode.INVALID_ARGUMENT, "token_ids"),
        (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[5] * 3000)), grpc.StatusCode.INVALID_ARGUMENT, "context length"),
        (pb.GenerateRequest(text=""), grpc.StatusCode.INVALID_ARGUMENT, "text"),
        (pb.GenerateRequest(text="word " * 3000), grpc.StatusCode.INVALID_ARGUMENT, "context length"),
        (pb.GenerateRequest(model="other", text="hi"), grpc.StatusCode.NOT_FOUND, "tiny-test"),
        (pb.GenerateRequest(request_id="x" * 300, text="hi"), grpc.StatusCode.INVALID_ARGUMENT, "request_id"),
        (pb.GenerateRequest(request_id="bad\nid", text="hi"), grpc.StatusCode.INVALID_ARGUMENT, "request_id"),
        chat_case("chat.messages"),
        chat_case("role", messages=msg(role="robot", content="x")),
        chat_case("role", messages=msg(role="", content="x")),
        chat_case("chat.messages[0]", messages=msg(role="tool", content="x")),
        chat_case("chat.messages[0]", messages=msg(role="tool", content="x", tool_call_id="nope")),
        chat_case("chat.messages[0]", messages=msg(role="assistant", tool_calls=[pb.ToolCall(name="bad name!")])),
        chat_case("chat.messages[0]", messages=msg(role="user", content="x", tool_calls=[pb.ToolCall(name="f")])),
        chat_case("chat.messages[0]", messages=msg(role="user", content="x", reasoning="y")),
        chat_case("parameters_json", messages=msg(role="user", content="x"),
                  tools=[pb.Tool(name="f", parameters_json="{")]),
        chat_case("parameters_json", messages=msg(role="user", content="x"), tools=[pb.Tool(name="f", parameters_json="5")]),
        chat_case("chat.tools[0].name", messages=msg(role="user", content="x"), tools=[pb.Tool(name="bad name")]),
        chat_case("tools", messages=msg(role="user", content="x"), tools=[tool, tool]),
        chat_case("tool_choice", messages=msg(role="user", content="x"), tools=[tool], tool_choice="missing_fn"),
        chat_case("tool_choice", messages=msg(role="user", content="x"), tool_choice="required"),
        chat_case("reasoning_effort", messages=msg(role="user", content="x"), reasoning_effort="extreme"),
        chat_case("context length", messages=msg(role="user", content="word " * 3000)),
    ]
    return cases


@pytest.fixture(scope="module")
def good_stream(serve_app, tiny_checkpoint):
    """A long streaming request that runs while the bad ones arrive; returns (text, expected text)."""
    prompt = list(range(500, 540))
    engine = Engine(gptoss.load_model(tiny_checkpoint, dtype=torch.float32), EngineConfig(num_kv_blocks=256))
    [expected] = engine.generate([prompt], SamplingParams.greedy(max_tokens=300))
    result = {}

    def run():
        body = {"model": "tiny-test", "prompt": prompt, "max_tokens": 300, "temperature": 0, "stream": True}
        text = []
        with requests.post(f"{serve_app.http}/v1/completions", json=body, stream=True, timeout=600) as response:
            for line in response.iter_lines():
                if line.startswith(b"data: {"):
                    text += [c["text"] for c in json.loads(line[6:])["choices"]]
        result["text"] = "".join(text)

    thread = threading.Thread(target=run)
    thread.start()
    yield lambda: (thread.join(600), result.get("text"), decode(list(expected.token_ids)))[1:]


def test_at_least_two_hundred_malformed_requests_are_refused_by_name_while_a_good_one_finishes(serve_app, good_stream):
    http, rpc = http_cases(), grpc_cases()
    assert len(http) + len(RAW_BODIES) + len(rpc) >= 200
    failures = []
    for endpoint, body, status, names in http:
        url = f"{serve_app.http}/v1/{'chat/completions' if endpoint == 'chat' else 'completions'}"
        response = requests.post(url, data=json.dumps(body), headers={"Content-Type": "application/json"}, timeout=60)
        error = response.json().get("error", {}) if response.headers.get("content-type") == "application/json" else {}
        said = f"{error.get('message', '')} {error.get('param') or ''}"
        if response.status_code != status or names not in said:
            failures.append((endpoint, body if len(json.dumps(body)) < 300 else "<big>", response.status_code, said))
    for raw, status, names in RAW_BODIES:
        response = requests.post(f"{serve_app.http}/v1/chat/completions", data=raw,
                                 headers={"Content-Type": "application/json"}, timeout=60)
        said = response.json()["error"]["message"] + " " + str(response.json()["error"]["param"])
        if response.status_code != status or names not in said:
            failures.append(("raw", raw, response.status_code, said))
    with grpc.insecure_channel(serve_app.grpc) as channel:
        stub = pb_grpc.GptossServiceStub(channel)
        for request, code, names in rpc:
            try:
                list(stub.Generate(request, timeout=60))
                failures.append(("grpc", str(request)[:200], "OK", ""))
            except grpc.RpcError as e:
                if e.code() != code or names not in (e.details() or ""):
                    failures.append(("grpc", str(request)[:200], e.code(), e.details()))
    assert not failures, "\n".join(map(str, failures))
    text, expected = good_stream()
    assert text == expected


def test_a_string_field_that_is_not_utf8_is_refused_over_grpc(serve_app):
    # protobuf's own parser refuses it before our code runs: the call must still end with a client error.
    body = bytes([0x22, 2, 0xFF, 0xFE])  # field 4 (text), length 2, invalid UTF-8
    with grpc.insecure_channel(serve_app.grpc) as channel:
        generate = channel.unary_stream("/gptoss.v1.GptossService/Generate", request_serializer=lambda b: b,
                                        response_deserializer=pb.GenerateResponse.FromString)
        with pytest.raises(grpc.RpcError) as info:
            list(generate(body, timeout=60))
    assert info.value.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)
