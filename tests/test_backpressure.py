"""Backpressure end to end: a model server that takes one request at a time and queues one more refuses
the next with 429 + Retry-After (HTTP) and RESOURCE_EXHAUSTED (gRPC), while the requests it took
finish; once they are done it serves again."""

from __future__ import annotations

import threading
import time

import grpc
import pytest
import requests

from serve.proto.gptoss.v1 import gptoss_pb2 as pb
from serve.proto.gptoss.v1 import gptoss_pb2_grpc as pb_grpc
from tests.conftest import SERVE_TEST_CONFIG

APP = "narrow"


@pytest.fixture(scope="module")
def narrow_app(serve_instance, tiny_checkpoint):
    from ray import serve

    from serve.app import MODEL_SERVER_NAME, build_app_from_config
    from serve.config import parse_config

    raw = {**SERVE_TEST_CONFIG,
           "model": {**SERVE_TEST_CONFIG["model"], "checkpoint": str(tiny_checkpoint), "name": APP},
           "model_server": {**SERVE_TEST_CONFIG["model_server"], "max_ongoing_requests": 1,
                            "max_queued_requests": 1}}
    serve.run(build_app_from_config(parse_config(raw)), name=APP, route_prefix=f"/{APP}")
    yield serve_instance, serve.get_deployment_handle(MODEL_SERVER_NAME, app_name=APP)
    serve.delete(APP)


def completion(http: str, max_tokens: int, stream: bool = False) -> requests.Response:
    body = {"model": APP, "prompt": [1, 2, 3, 4], "max_tokens": max_tokens, "temperature": 0, "stream": stream}
    return requests.post(f"{http}/{APP}/v1/completions", json=body, timeout=120, stream=stream)


def test_a_full_queue_answers_429_with_retry_after_and_resource_exhausted(narrow_app):
    endpoints, _ = narrow_app
    assert completion(endpoints.http, 2).status_code == 200  # the replica is up
    running = threading.Event()
    results: dict[str, requests.Response] = {}

    def long_request() -> None:
        with completion(endpoints.http, 1800, stream=True) as response:
            results["running"] = response
            for _ in response.iter_lines():  # read to the end
                running.set()

    def short_request(key: str) -> None:
        results[key] = completion(endpoints.http, 4)

    first = threading.Thread(target=long_request)
    first.start()
    assert running.wait(60)
    # One replica slot, taken; one queue place: of three more requests one waits, the others are refused.
    burst = [threading.Thread(target=short_request, args=(f"short-{i}",)) for i in range(3)]
    for thread in burst:
        thread.start()
    deadline = time.monotonic() + 60
    while sum(1 for k, r in results.items() if k.startswith("short") and r.status_code == 429) < 2:
        assert time.monotonic() < deadline, {k: r.status_code for k, r in results.items()}
        time.sleep(0.05)
    assert first.is_alive()  # the queue is still full: gRPC is refused too
    with grpc.insecure_channel(endpoints.grpc) as channel, pytest.raises(grpc.RpcError) as info:
        list(pb_grpc.GptossServiceStub(channel).Generate(
            pb.GenerateRequest(token_ids=pb.TokenIds(ids=[5, 6]), sampling=pb.SamplingParams(max_tokens=4)),
            metadata=[("application", APP)], timeout=60))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, info.value
    for thread in (first, *burst):
        thread.join(120)
    statuses = sorted(results[f"short-{i}"].status_code for i in range(3))
    assert statuses == [200, 429, 429] and results["running"].status_code == 200  # the taken ones finish
    refused = next(results[f"short-{i}"] for i in range(3) if results[f"short-{i}"].status_code == 429)
    assert int(refused.headers["Retry-After"]) >= 1 and refused.json()["error"]["type"] == "rate_limit_error"
    assert completion(endpoints.http, 4).status_code == 200  # and it serves again
