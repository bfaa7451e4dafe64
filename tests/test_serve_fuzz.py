"""A bounded fuzz run in CI: hundreds of random malformed bodies and messages of every field type on both
APIs, while good streams run beside them. None gets a 5xx (gRPC: INTERNAL, UNKNOWN, UNAVAILABLE), every
4xx has OpenAI's error shape with a message, the good streams finish with every token, and the server is
healthy after. The long run is benchmarks/fuzz_serve.py."""

from __future__ import annotations

import json
import random
import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
import requests

from tests.fuzz_requests import grpc_case, grpc_verdict, http_case, http_verdict

NUM_HTTP, NUM_GRPC, NUM_GOOD = 300, 150, 4


def good_stream(http: str, i: int, results: dict) -> None:
    body = {"model": "tiny-test", "prompt": [40 + i, 41, 42], "max_tokens": 200, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    finish, usage = None, None
    with requests.post(f"{http}/v1/completions", json=body, stream=True, timeout=300) as response:
        for line in response.iter_lines():
            if line.startswith(b"data: {"):
                event = json.loads(line[6:])
                for choice in event.get("choices", []):
                    finish = choice["finish_reason"] or finish
                usage = event.get("usage") or usage
    results[i] = (finish, usage and usage["completion_tokens"])


def test_malformed_requests_on_both_apis_get_client_errors_while_good_streams_finish(serve_app):
    rng = random.Random(20261206)
    http_cases = [http_case(rng) for _ in range(NUM_HTTP)]
    grpc_cases = [grpc_case(rng) for _ in range(NUM_GRPC)]
    good: dict[int, tuple] = {}
    streams = [threading.Thread(target=good_stream, args=(serve_app.http, i, good)) for i in range(NUM_GOOD)]
    for thread in streams:
        thread.start()
    channel = grpc.insecure_channel(serve_app.grpc)
    generate = channel.unary_stream("/gptoss.v1.GptossService/Generate", request_serializer=lambda b: b,
                                    response_deserializer=lambda b: b)

    def send_http(case) -> str | None:
        response = requests.post(f"{serve_app.http}/v1/{case.path}", data=case.body, timeout=120,
                                 headers={"Content-Type": "application/json"})
        verdict = http_verdict(response.status_code, response.content)
        return verdict and f"HTTP {case.path} ({case.what}): {verdict}"

    def send_grpc(case) -> str | None:
        try:
            list(generate(case.body, timeout=120))
            code, details = "OK", ""
        except grpc.RpcError as e:
            code, details = e.code().name, e.details() or ""
        verdict = grpc_verdict(code, details)
        return verdict and f"gRPC ({case.what}): {verdict}"

    with ThreadPoolExecutor(4) as pool:
        verdicts = list(pool.map(send_http, http_cases)) + list(pool.map(send_grpc, grpc_cases))
    channel.close()
    for thread in streams:
        thread.join(300)
    failures = [v for v in verdicts if v]
    assert not failures, "\n".join(failures[:20])
    assert good == {i: ("length", 200) for i in range(NUM_GOOD)}
    assert requests.get(f"{serve_app.http}/health", timeout=30).status_code == 200
    reply = requests.post(f"{serve_app.http}/v1/completions", timeout=60,
                          json={"model": "tiny-test", "prompt": [1, 2, 3], "max_tokens": 2})
    assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 2
