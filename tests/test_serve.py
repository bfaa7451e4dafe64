"""The serving surface through real Ray Serve on a simulated two-node cluster: the official `openai`
client against the HTTP API, `grpcio` stubs from the repo's proto against the gRPC service.

The tiny model has random weights, so a chat's output is not harmony (its content stays empty); token
ids and plain text are compared with a bare engine in this process, and harmony's parsing of real
replies is covered on token streams in tests/test_gateway.py (and end to end for tool calls by
tests/test_serve_tools.py's scripted checkpoint).
"""

from __future__ import annotations

import asyncio
import time

import grpc
import openai
import pytest
import requests
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

import gptoss
from engine import Engine, EngineConfig, SamplingParams
from gptoss.tokenizer import decode, encode
from serve.proto.gptoss.v1 import gptoss_pb2 as pb
from serve.proto.gptoss.v1 import gptoss_pb2_grpc as pb_grpc
from tests.serve_helpers import metric_total

PROMPT_IDS = [[9906, 11, 1879, 0], [40, 1093, 21, 128, 37, 5, 77, 6000], list(range(1000, 1040))]


@pytest.fixture(scope="module")
def reference(tiny_checkpoint):
    """A bare engine in this process: the ground truth for greedy outputs."""
    engine = Engine(gptoss.load_model(tiny_checkpoint, dtype=torch.float32), EngineConfig(num_kv_blocks=256))

    def run(prompts, max_tokens):
        return [list(c.token_ids) for c in engine.generate(prompts, SamplingParams.greedy(max_tokens=max_tokens))]

    return run


@pytest.fixture(scope="module")
def client(serve_app):
    return openai.OpenAI(base_url=f"{serve_app.http}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def stub(serve_app):
    with grpc.insecure_channel(serve_app.grpc) as channel:
        yield pb_grpc.GptossServiceStub(channel)


def kv_settles_empty(serve_app, timeout_s: float = 30.0):
    """The model server's stats once it holds no request (bounded wait)."""
    deadline = time.monotonic() + timeout_s
    while True:
        stats = serve_app.model_server.stats.remote().result()
        if (stats.num_running == 0 and stats.num_waiting == 0 and stats.num_kv_blocks_used == 0) \
                or time.monotonic() > deadline:
            return stats
        time.sleep(0.05)


def test_the_openai_client_lists_the_served_model(client, serve_app):
    [model] = client.models.list().data
    assert model.id == serve_app.name and model.owned_by == "gptoss-serve"
    assert model.model_extra["max_model_len"] == 2048
    assert sorted(model.model_extra["kernels"]) == ["decode_attention", "greedy_screen", "mxfp4_linear"]
    assert requests.get(f"{serve_app.http}/health", timeout=30).status_code == 200


def test_completions_on_token_ids_equal_the_bare_engine(client, reference):
    expected = reference(PROMPT_IDS, 12)
    reply = client.completions.create(model="tiny-test", prompt=PROMPT_IDS, max_tokens=12, temperature=0)
    assert [c.text for c in sorted(reply.choices, key=lambda c: c.index)] == [decode(t) for t in expected]
    assert all(c.finish_reason == "length" for c in reply.choices)
    assert reply.usage.prompt_tokens == sum(map(len, PROMPT_IDS)) and reply.usage.completion_tokens == 36
    streamed = [""] * len(PROMPT_IDS)
    for chunk in client.completions.create(model="tiny-test", prompt=PROMPT_IDS, max_tokens=12, temperature=0,
                                           stream=True):
        for choice in chunk.choices:
            streamed[choice.index] += choice.text
    assert streamed == [decode(t) for t in expected]


def test_completion_logprobs_are_the_models(client, reference):
    [expected] = reference(PROMPT_IDS[:1], 4)
    reply = client.completions.create(model="tiny-test", prompt=PROMPT_IDS[0], max_tokens=4, temperature=0, logprobs=2)
    lp = reply.choices[0].logprobs
    assert lp.tokens == [decode([t]) for t in expected]
    assert all(v <= 0 for v in lp.token_logprobs) and all(len(top) >= 1 for top in lp.top_logprobs)


def test_a_stop_string_ends_the_text_before_it(client, reference):
    [expected] = reference(PROMPT_IDS[1:2], 16)
    text = decode(expected)
    stop = text[len(text) // 2: len(text) // 2 + 3]
    reply = client.completions.create(model="tiny-test", prompt=PROMPT_IDS[1], max_tokens=16, temperature=0, stop=[stop])
    assert reply.choices[0].text == text[:text.index(stop)] and reply.choices[0].finish_reason == "stop"


def test_chat_stream_and_whole_reply_agree_and_report_usage(client):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
    whole = client.chat.completions.create(model="tiny-test", messages=messages, max_tokens=10, temperature=0)
    assert whole.choices[0].finish_reason == "length" and whole.choices[0].message.role == "assistant"
    assert whole.usage.completion_tokens == 10 and whole.usage.prompt_tokens > 20
    chunks = list(client.chat.completions.create(model="tiny-test", messages=messages, max_tokens=10, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    usage = chunks[-1].usage
    assert usage.completion_tokens == 10 and usage.prompt_tokens == whole.usage.prompt_tokens
    # The same prompt again: its full blocks come from the prefix cache.
    assert usage.prompt_tokens_details.cached_tokens > 0
    counted = [c.usage.completion_tokens for c in client.chat.completions.create(
        model="tiny-test", messages=messages, max_tokens=10, temperature=0, stream=True,
        stream_options={"include_usage": True, "continuous_usage_stats": True})]
    assert counted == sorted(counted) and counted[-1] == 10 and len(counted) > 2  # usage on every chunk


def test_n_choices_with_a_seed_are_reproducible(client):
    def ask():
        reply = client.completions.create(model="tiny-test", prompt=PROMPT_IDS[0], max_tokens=8, n=3, seed=11,
                                          temperature=1.0)
        return [c.text for c in sorted(reply.choices, key=lambda c: c.index)]

    first = ask()
    assert len(first) == 3 and len(set(first)) > 1  # choice i samples with seed + i
    assert ask() == first


def test_an_unknown_model_is_a_404_listing_the_served_one(client):
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "hi"}])
    assert "tiny-test" in info.value.message and info.value.body["param"] == "model"


def test_a_prompt_longer_than_the_context_is_a_400_context_length_exceeded(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="tiny-test", prompt=[5] * 2048, max_tokens=1)
    assert info.value.code == "context_length_exceeded" and "2048" in info.value.message


def test_grpc_generate_on_token_ids_equals_the_bare_engine(stub, reference):
    [expected] = reference(PROMPT_IDS[2:], 10)
    request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=PROMPT_IDS[2]),
                                 sampling=pb.SamplingParams(max_tokens=10, temperature=0))
    replies = list(stub.Generate(request, timeout=60))
    assert [t for r in replies for t in r.token_ids] == expected
    assert "".join(r.text for r in replies) == decode(expected)
    assert replies[-1].finish_reason == pb.FINISH_REASON_LENGTH and replies[-1].usage.completion_tokens == 10


def test_grpc_chat_equals_the_http_chat(stub, client):
    messages = [{"role": "user", "content": "Tell me a story"}]
    http = client.chat.completions.create(model="tiny-test", messages=messages, max_tokens=12, temperature=0,
                                          reasoning_effort="low")
    replies = list(stub.Generate(pb.GenerateRequest(
        model="tiny-test", chat=pb.Chat(messages=[pb.ChatMessage(role="user", content="Tell me a story")],
                                        reasoning_effort="low"),
        sampling=pb.SamplingParams(max_tokens=12, temperature=0)), timeout=60))
    final = "".join(r.text for r in replies if r.channel in (pb.CHANNEL_FINAL, pb.CHANNEL_COMMENTARY))
    analysis = "".join(r.text for r in replies if r.channel == pb.CHANNEL_ANALYSIS)
    assert final == http.choices[0].message.content and analysis == (http.choices[0].message.reasoning or "")
    assert replies[-1].usage.prompt_tokens == http.usage.prompt_tokens
    assert replies[-1].usage.completion_tokens == http.usage.completion_tokens == 12


def test_grpc_reflection_health_and_model_info(serve_app, stub):
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    with grpc.insecure_channel(serve_app.grpc) as channel:
        assert "gptoss.v1.GptossService" in set(ProtoReflectionDescriptorDatabase(channel).get_services())
        health = health_pb2_grpc.HealthStub(channel)
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=30).status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as info:
            health.Check(health_pb2.HealthCheckRequest(service="other.Service"), timeout=30)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
    info = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=30)
    assert (info.model, info.max_model_len, info.vocab_size, info.num_ranks_per_group) == ("tiny-test", 2048, 201088, 1)
    # The CPU kernels were loaded when the rank started, and say how they run (this machine has a compiler);
    # the greedy screen is opt-in (engine.greedy_screen), and says so.
    kernels = dict(info.kernels)
    assert sorted(kernels) == ["decode_attention", "greedy_screen", "mxfp4_linear"]
    assert kernels.pop("greedy_screen").startswith("off (engine.greedy_screen false")
    assert all(how.startswith(("compiled", "prebuilt")) for how in kernels.values()), kernels


def test_a_cancelled_grpc_call_frees_its_kv_blocks(serve_app, stub):
    """Eight cancels in a row: two races in Ray once lost one cancel in ten (the proxy's generator closed
    instead of cancelled, and the rank's abort cancelled as a child of the cancelled model server call),
    and the request ran on to max_tokens."""
    before = sum(r.num_output_tokens for r in kv_settles_empty(serve_app).ranks)
    for i in range(8):
        # Sampled, and as long as max_model_len (2048) allows: greedy decoding of the tiny model is fast
        # on CPU (exact screened argmax), and the cancel must land before the request could end by itself.
        call = stub.Generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=list(range(1, 200))),
                                                sampling=pb.SamplingParams(max_tokens=1840, temperature=1, seed=i)),
                             timeout=120)
        next(call)
        if i == 0:
            busy = serve_app.model_server.stats.remote().result()
            assert busy.num_kv_blocks_used > 0  # the request holds its prompt's blocks
        call.cancel()
        stats = kv_settles_empty(serve_app)
        assert stats.num_running == 0 and stats.num_kv_blocks_used == 0, f"cancel {i}"
    assert sum(r.num_output_tokens for r in stats.ranks) - before < 1840  # none ran to max_tokens


def test_an_http_client_that_goes_away_aborts_its_request(serve_app):
    body = {"model": "tiny-test", "prompt": list(range(3, 120)), "max_tokens": 1920, "temperature": 1, "seed": 7,
            "stream": True}  # sampled and long, as above
    before = sum(r.num_output_tokens for r in kv_settles_empty(serve_app).ranks)
    with requests.post(f"{serve_app.http}/v1/completions", json=body, timeout=60, stream=True) as response:
        assert next(line for line in response.iter_lines() if line).startswith(b"data: ")
    stats = kv_settles_empty(serve_app)
    assert stats.num_running == 0 and stats.num_kv_blocks_used == 0
    assert sum(r.num_output_tokens for r in stats.ranks) - before < 1920


def test_a_grpc_deadline_ends_the_call_with_deadline_exceeded_and_aborts_the_request(serve_app, stub):
    before = sum(r.num_output_tokens for r in kv_settles_empty(serve_app).ranks)
    # Sampled and as long as max_model_len allows, as above: the deadline must land first.
    call = stub.Generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=list(range(5, 150))),
                                            sampling=pb.SamplingParams(max_tokens=1890, temperature=1, seed=3)),
                         timeout=1.5)
    with pytest.raises(grpc.RpcError) as info:
        list(call)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    stats = kv_settles_empty(serve_app)
    assert stats.num_running == 0 and stats.num_kv_blocks_used == 0
    assert sum(r.num_output_tokens for r in stats.ranks) - before < 1890


def test_an_http_request_past_its_timeout_field_is_a_504_and_is_aborted(serve_app):
    before = sum(r.num_output_tokens for r in kv_settles_empty(serve_app).ranks)
    body = {"model": "tiny-test", "prompt": list(range(7, 150)), "max_tokens": 1890, "temperature": 1, "seed": 3,
            "timeout": 0.5}
    response = requests.post(f"{serve_app.http}/v1/completions", json=body, timeout=60)
    assert response.status_code == 504
    assert "timeout" in response.json()["error"]["message"]
    stats = kv_settles_empty(serve_app)
    assert stats.num_running == 0 and stats.num_kv_blocks_used == 0
    assert sum(r.num_output_tokens for r in stats.ranks) - before < 1890


def test_a_text_prompt_is_encoded_without_a_template_on_http_and_grpc(client, stub, reference):
    text = "The capital of France is"
    [expected] = reference([encode(text)], 6)
    reply = client.completions.create(model="tiny-test", prompt=text, max_tokens=6, temperature=0)
    assert reply.choices[0].text == decode(expected) and reply.usage.prompt_tokens == len(encode(text))
    replies = list(stub.Generate(pb.GenerateRequest(text=text, sampling=pb.SamplingParams(max_tokens=6, temperature=0)),
                                 timeout=60))
    assert [t for r in replies for t in r.token_ids] == expected


def test_max_completion_tokens_limits_a_chat_reply(client):
    reply = client.chat.completions.create(model="tiny-test", messages=[{"role": "user", "content": "Hi"}],
                                           max_completion_tokens=5, temperature=0)
    assert reply.usage.completion_tokens == 5 and reply.choices[0].finish_reason == "length"


def test_abort_ends_a_running_grpc_stream_with_finish_reason_abort(serve_app, stub):
    request = pb.GenerateRequest(request_id="abort-me", token_ids=pb.TokenIds(ids=[1, 2, 3]),
                                 sampling=pb.SamplingParams(max_tokens=1500, temperature=0))
    call = stub.Generate(request, timeout=120)
    next(call)
    assert stub.Abort(pb.AbortRequest(request_id="abort-me"), timeout=30).aborted
    rest = list(call)
    assert rest[-1].finish_reason == pb.FINISH_REASON_ABORT
    assert sum(len(r.token_ids) for r in rest) < 1500
    assert not stub.Abort(pb.AbortRequest(request_id="abort-me"), timeout=30).aborted  # it is gone
    assert kv_settles_empty(serve_app).num_kv_blocks_used == 0


def test_concurrent_streams_each_get_their_own_greedy_tokens(serve_app, reference):
    async def all_at_once():
        client = openai.AsyncOpenAI(base_url=f"{serve_app.http}/v1", api_key="unused", max_retries=0)
        replies = await asyncio.gather(*(client.completions.create(model="tiny-test", prompt=p, max_tokens=8,
                                                                   temperature=0) for p in PROMPT_IDS * 3))
        await client.close()
        return [r.choices[0].text for r in replies]

    expected = [decode(t) for t in reference(PROMPT_IDS, 8)] * 3
    assert asyncio.run(all_at_once()) == expected


def test_merged_streams_arrive_whole_and_in_order_while_one_of_them_is_cancelled(serve_app, reference):
    """24 streams open at once share one token channel from the model server to the gateway (one frame
    per engine step for all of them): every stream still gets its exact greedy tokens in order, one
    cancelled after its first chunk frees its KV blocks without disturbing the others, and the tokens
    came over the channel, not in the streams' Serve calls (only each stream's last chunk does)."""
    prompts = [[(7 * i + j) % 5000 + 3 for j in range(5 + i % 11)] for i in range(23)]
    expected = reference(prompts, 24)

    async def all_at_once():
        client = openai.AsyncOpenAI(base_url=f"{serve_app.http}/v1", api_key="unused", max_retries=0)

        async def stream(prompt):
            chunks = []
            response = await client.completions.create(model="tiny-test", prompt=prompt, max_tokens=24,
                                                       temperature=0, stream=True)
            async for event in response:
                chunks.append(event.choices[0].text if event.choices else "")
            return chunks

        async def cancelled():
            body = {"model": "tiny-test", "prompt": list(range(3, 120)), "max_tokens": 1900, "temperature": 1,
                    "seed": 5, "stream": True}
            response = await client.completions.create(**body)
            async for _ in response:
                break  # leave after the first chunk
            await response.close()

        results = await asyncio.gather(*(stream(p) for p in prompts), cancelled())
        await client.close()
        return results[:-1]

    url, name = f"{serve_app.http}/metrics", "ray_gptoss_gateway_received_tokens_total"

    def received() -> dict[str, float]:
        return {path: metric_total(url, name, f'path="{path}"', at_least=0) for path in ("channel", "call")}

    # One request first: the model server connects to the gateway's channel in the background meanwhile.
    start = received()
    warm_up = requests.post(f"{serve_app.http}/v1/completions", timeout=60,
                            json={"model": "tiny-test", "prompt": [5, 6, 7], "max_tokens": 2})
    deadline = time.monotonic() + 30
    while sum((before := received()).values()) < sum(start.values()) + warm_up.json()["usage"]["completion_tokens"]:
        assert time.monotonic() < deadline
        time.sleep(0.5)
    got = asyncio.run(all_at_once())
    for chunks, want in zip(got, expected, strict=True):
        assert "".join(chunks) == decode(want)
    stats = kv_settles_empty(serve_app)
    assert stats.num_running == 0 and stats.num_kv_blocks_used == 0
    # The 23 finished streams' tokens came over the channel, but for each one's last chunk in its call.
    total = sum(len(want) for want in expected)
    channel = metric_total(url, name, 'path="channel"', at_least=before["channel"] + total - 23) - before["channel"]
    call = metric_total(url, name, 'path="call"', at_least=before["call"] + 23) - before["call"]
    # Ray's exporter may still add an earlier request's few tokens to either side: bounds, not equality.
    assert channel >= total - 23 and 23 <= call <= 23 + 10, (channel, call, total)
