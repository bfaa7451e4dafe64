"""The serving edge through the real servers (Serve's proxies, the official clients): hostile sizes refused
by name on both APIs before any work, the gRPC size limit in the proxy, request ids on every response,
a maximal request that cannot stall the streams beside it, health that never wakes a model server, and
a full gateway answering 429 / RESOURCE_EXHAUSTED."""

from __future__ import annotations

import json
import socket
import threading
import time

import grpc
import pytest
import requests
from grpc_health.v1 import health_pb2, health_pb2_grpc

from serve.proto.gptoss.v1 import gptoss_pb2 as pb
from serve.proto.gptoss.v1 import gptoss_pb2_grpc as pb_grpc
from tests.conftest import SERVE_TEST_CONFIG

HUGE = 2**31
MESSAGE = {"role": "user", "content": "hi"}
TOOL = {"type": "function", "function": {"name": "f"}}

# (HTTP endpoint, body, the field the error must name); each would allocate in the bound's size if it
# were checked late (n choices, top-logprob lists, stop matchers, renders).
HTTP_HOSTILE = [
    ("chat/completions", {"messages": [MESSAGE], "n": HUGE}, "n"),
    ("chat/completions", {"messages": [MESSAGE], "logprobs": True, "top_logprobs": HUGE}, "top_logprobs"),
    ("chat/completions", {"messages": [MESSAGE], "stop": "x" * 70_000}, "stop"),
    ("chat/completions", {"messages": [MESSAGE] * 3000}, "messages"),
    ("chat/completions", {"messages": [MESSAGE], "tools": [TOOL] * 200}, "tools"),
    ("chat/completions", {"messages": [MESSAGE], "metadata": {"x" * 70_000: "y"}}, "metadata"),
    ("completions", {"prompt": [[1]] * 200, "max_tokens": 1}, "prompt"),
    ("completions", {"prompt": [1], "n": HUGE}, "n"),
    ("completions", {"prompt": [1], "logprobs": HUGE}, "logprobs"),
]
GRPC_HOSTILE = [
    (dict(sampling=pb.SamplingParams(n=HUGE)), "sampling.n"),
    (dict(sampling=pb.SamplingParams(logprobs=HUGE)), "sampling.logprobs"),
    (dict(sampling=pb.SamplingParams(stop=["x" * 70_000])), "sampling.stop"),
    (dict(chat=pb.Chat(messages=[pb.ChatMessage(role="user", content="hi")] * 3000)), "chat.messages"),
    (dict(chat=pb.Chat(messages=[pb.ChatMessage(role="user", content="hi")], tools=[pb.Tool(name="f")] * 200)),
     "chat.tools"),
]


@pytest.mark.parametrize("endpoint, body, param", HTTP_HOSTILE, ids=[f"{e}-{p}" for e, _, p in HTTP_HOSTILE])
def test_hostile_sizes_are_refused_by_name_over_http_with_a_short_message(serve_app, endpoint, body, param):
    response = requests.post(f"{serve_app.http}/v1/{endpoint}", json={"model": "tiny-test"} | body, timeout=60)
    error = response.json()["error"]
    assert response.status_code == 400 and error["param"].startswith(param), response.text[:500]
    assert len(response.content) < 2000  # a 70 KB value is not echoed back


@pytest.mark.parametrize("fields, param", GRPC_HOSTILE, ids=[p for _, p in GRPC_HOSTILE])
def test_hostile_sizes_are_refused_by_name_over_grpc(serve_app, fields, param):
    request = pb.GenerateRequest(**({"text": "hi"} | fields if "chat" not in fields else fields))
    with grpc.insecure_channel(serve_app.grpc) as channel, pytest.raises(grpc.RpcError) as info:
        list(pb_grpc.GptossServiceStub(channel).Generate(request, timeout=60))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and info.value.details().startswith(param)
    assert len(info.value.details()) < 1000


def test_a_body_nested_a_hundred_thousand_deep_is_a_400(serve_app):
    body = b'{"model": "tiny-test", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    response = requests.post(f"{serve_app.http}/v1/chat/completions", data=body, timeout=60,
                             headers={"Content-Type": "application/json"})
    assert response.status_code == 400 and "nested deeper" in response.json()["error"]["message"]


def test_grpc_messages_over_the_limit_are_refused_by_the_proxy_and_random_bytes_are_malformed(serve_app):
    limit = SERVE_TEST_CONFIG["gateway"]["max_request_bytes"]  # the proxy's too (tests/conftest.py)
    with grpc.insecure_channel(serve_app.grpc, options=[("grpc.max_send_message_length", 8 * limit)]) as channel:
        with pytest.raises(grpc.RpcError) as info:
            list(pb_grpc.GptossServiceStub(channel).Generate(pb.GenerateRequest(text="x" * 2 * limit), timeout=60))
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        generate = channel.unary_stream("/gptoss.v1.GptossService/Generate", request_serializer=lambda b: b,
                                        response_deserializer=pb.GenerateResponse.FromString)
        with pytest.raises(grpc.RpcError) as info:
            list(generate(bytes(range(256)) * 4, timeout=60))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "malformed" in info.value.details()
        check = channel.unary_unary("/grpc.health.v1.Health/Check", request_serializer=lambda b: b,
                                    response_deserializer=health_pb2.HealthCheckResponse.FromString)
        with pytest.raises(grpc.RpcError) as info:
            check(b"\xff\xff\xff", timeout=60)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_every_response_carries_the_request_id_the_client_chose_or_one_made_for_it(serve_app):
    chat = {"model": "tiny-test", "messages": [MESSAGE], "max_tokens": 2}
    mine = requests.post(f"{serve_app.http}/v1/chat/completions", json=chat, headers={"x-request-id": "order-66"},
                         timeout=60)
    assert mine.headers["x-request-id"] == "order-66" and mine.json()["id"] == "chatcmpl-order-66"
    made = requests.post(f"{serve_app.http}/v1/chat/completions", json=chat, timeout=60)
    assert made.json()["id"] == f"chatcmpl-{made.headers['x-request-id']}"
    refused = requests.post(f"{serve_app.http}/v1/chat/completions", json=chat | {"n": 0}, timeout=60,
                            headers={"x-request-id": "bad-one"})
    assert refused.status_code == 400 and refused.headers["x-request-id"] == "bad-one"
    with grpc.insecure_channel(serve_app.grpc) as channel:
        stream = pb_grpc.GptossServiceStub(channel).Generate(
            pb.GenerateRequest(text="hi", request_id="grpc-order-7", sampling=pb.SamplingParams(max_tokens=2)),
            timeout=60)
        replies = list(stream)
        assert {r.request_id for r in replies} == {"grpc-order-7"}
        assert ("x-request-id", "grpc-order-7") in list(stream.trailing_metadata())


def test_a_maximal_request_does_not_stall_the_streams_running_beside_it(serve_app):
    """16 streams run; a chat whose one 400,000-letter word harmony tokenizes in quadratic time (about a
    minute) arrives. It is refused after gateway.admission_timeout_s, spent in an admission worker: the
    streams' tokens keep coming (on the event loop it would have stopped them all for the whole render)."""
    gaps: dict[int, list[float]] = {i: [] for i in range(16)}
    started, done = threading.Barrier(17), threading.Event()

    def stream(i: int) -> None:
        body = {"model": "tiny-test", "prompt": [100 + i, 7, 8], "max_tokens": 1500, "temperature": 1, "seed": i,
                "stream": True}
        with requests.post(f"{serve_app.http}/v1/completions", json=body, stream=True, timeout=120) as response:
            last = None
            for line in response.iter_lines():
                if not line:
                    continue  # the blank line that ends each event
                now = time.monotonic()
                if last is None:
                    started.wait(60)
                elif not done.is_set():
                    gaps[i].append(now - last)
                last = now
                if done.is_set():
                    break

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(16)]
    for thread in threads:
        thread.start()
    started.wait(60)
    time.sleep(1.0)
    big = {"model": "tiny-test", "messages": [{"role": "user", "content": "x" * 400_000}], "max_tokens": 1}
    sent = time.monotonic()
    response = requests.post(f"{serve_app.http}/v1/chat/completions", data=json.dumps(big), timeout=120,
                             headers={"Content-Type": "application/json"})
    took = time.monotonic() - sent
    done.set()
    for thread in threads:
        thread.join(120)
    assert response.status_code == 413 and "admission_timeout_s" in response.json()["error"]["message"]
    worst = max(max(g) for g in gaps.values() if g)
    assert took > 3 * worst, (took, worst)  # the streams went on while it was being admitted
    assert worst < 1.5, worst


@pytest.fixture(scope="module")
def idle_app(serve_instance, tiny_checkpoint):
    """An app scaled to zero groups whose gateway takes one request and queues one more."""
    from ray import serve

    from serve.app import build_app_from_config
    from serve.config import parse_config

    raw = {**SERVE_TEST_CONFIG,
           "model": {**SERVE_TEST_CONFIG["model"], "checkpoint": str(tiny_checkpoint), "name": "idle"},
           "model_server": {**SERVE_TEST_CONFIG["model_server"], "stats_period_s": 0.5,
                            "autoscaling": {"min_replicas": 0, "max_replicas": 1, "initial_replicas": 0}},
           "gateway": {**SERVE_TEST_CONFIG["gateway"], "max_ongoing_requests": 1, "max_queued_requests": 1}}
    serve.run(build_app_from_config(parse_config(raw)), name="idle", route_prefix="/idle")
    yield serve_instance
    serve.delete("idle")


def model_servers_running(app: str) -> int:
    from ray import serve

    deployment = serve.status().applications[app].deployments["ModelServer"]
    return sum(n for state, n in deployment.replica_states.items() if str(getattr(state, "value", state)) != "STOPPING")


def test_health_probes_never_wake_a_model_server_scaled_to_zero(idle_app):
    for _ in range(20):
        response = requests.get(f"{idle_app.http}/idle/health", timeout=30)
        assert response.status_code == 200 and response.json()["model_servers"]["running"] == 0
        with grpc.insecure_channel(idle_app.grpc) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                               metadata=[("application", "idle")], timeout=30)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        time.sleep(0.1)
    time.sleep(3)  # past Serve's autoscaling look at the handles' queues
    assert model_servers_running("idle") == 0


def test_docs_are_open_without_keys(idle_app):
    assert requests.get(f"{idle_app.http}/idle/openapi.json", timeout=30).status_code == 200


def test_a_full_gateway_answers_429_with_retry_after_and_resource_exhausted(idle_app):
    """Two requests that hold the gateway (their bodies arrive slowly): one runs, one waits in the proxy's
    queue; the next is refused there."""
    host, port = idle_app.http.removeprefix("http://").split(":")
    holders = []
    try:
        for _ in range(2):
            holder = socket.create_connection((host, int(port)), timeout=30)
            holder.sendall(b"POST /idle/v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                           b"Content-Length: 1000\r\n\r\n{")
            holders.append(holder)
            time.sleep(0.5)
        response = requests.get(f"{idle_app.http}/idle/health", timeout=30)  # a probe: it never calls a group
        assert response.status_code == 429 and int(response.headers["Retry-After"]) >= 1
        with grpc.insecure_channel(idle_app.grpc) as channel, pytest.raises(grpc.RpcError) as info:
            list(pb_grpc.GptossServiceStub(channel).Generate(pb.GenerateRequest(text="hi"),
                                                             metadata=[("application", "idle")], timeout=30))
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        for holder in holders:
            holder.close()
    assert model_servers_running("idle") == 0
