"""The group is the unit of failure behind Serve: a G=2 model server replica whose ranks sit on both
simulated nodes loses a rank; with moving off (gateway.max_migrations 0) its in-flight requests end with
503 / UNAVAILABLE, Serve's health check replaces the replica, and new requests succeed on the new group.
(With moving on, a stream whose only group fails waits for the replacement: gateway.migration_wait_s.)"""

from __future__ import annotations

import os
import signal
import threading
import time

import grpc
import pytest
import ray
import requests
from ray.util.placement_group import placement_group, remove_placement_group

from serve.proto.gptoss.v1 import gptoss_pb2 as pb
from serve.proto.gptoss.v1 import gptoss_pb2_grpc as pb_grpc
from tests.conftest import SERVE_TEST_CONFIG

APP = "spanning"


@pytest.fixture(scope="module")
def spanning_app(serve_instance, tiny_checkpoint):
    from ray import serve

    from serve.app import MODEL_SERVER_NAME, build_app_from_config
    from serve.config import parse_config

    # Each node has 3 fake GPUs: holding 2 on each leaves one per node, so the replica's two GPU rank
    # bundles cannot both fit on one node (PACK) and the group spans the cluster.
    blocker = placement_group([{"GPU": 2}, {"GPU": 2}], strategy="STRICT_SPREAD")
    ray.get(blocker.ready(), timeout=60)
    raw = {**SERVE_TEST_CONFIG,
           "model": {**SERVE_TEST_CONFIG["model"], "checkpoint": str(tiny_checkpoint), "name": "spanning"},
           "group": {"num_ranks": 2, "device": "cuda", "collective_timeout_s": 5, "step_timeout_s": 10},
           "gateway": {**SERVE_TEST_CONFIG["gateway"], "max_migrations": 0}}
    serve.run(build_app_from_config(parse_config(raw)), name=APP, route_prefix=f"/{APP}")
    yield serve_instance, serve.get_deployment_handle(MODEL_SERVER_NAME, app_name=APP)
    serve.delete(APP)
    remove_placement_group(blocker)


def completion(http: str, max_tokens: int, timeout_s: float = 60) -> requests.Response:
    body = {"model": "spanning", "prompt": [1, 2, 3, 4], "max_tokens": max_tokens, "temperature": 0}
    return requests.post(f"{http}/{APP}/v1/completions", json=body, timeout=timeout_s)


def test_killing_a_rank_fails_in_flight_requests_and_serve_brings_a_working_replica_back(spanning_app):
    endpoints, model_server = spanning_app
    stats = model_server.stats.remote().result()
    assert stats.state == "healthy" and len({r.node_id for r in stats.ranks}) == 2
    results: dict[str, object] = {}
    streaming = threading.Event()

    def http_request():
        results["http"] = completion(endpoints.http, 1500)

    def grpc_stream():
        request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=[5, 6, 7]),
                                     sampling=pb.SamplingParams(max_tokens=1500, temperature=0))
        with grpc.insecure_channel(endpoints.grpc) as channel:
            try:
                for _ in pb_grpc.GptossServiceStub(channel).Generate(request, metadata=[("application", APP)],
                                                                     timeout=120):
                    streaming.set()
                results["grpc"] = "finished"
            except grpc.RpcError as e:
                results["grpc"] = e

    threads = [threading.Thread(target=http_request), threading.Thread(target=grpc_stream)]
    for thread in threads:
        thread.start()
    assert streaming.wait(60)
    os.kill(stats.ranks[1].pid, signal.SIGKILL)
    for thread in threads:
        thread.join(60)
    http, rpc = results["http"], results["grpc"]
    assert http.status_code == 503 and "failed" in http.json()["error"]["message"], http.text
    assert isinstance(rpc, grpc.RpcError) and rpc.code() == grpc.StatusCode.UNAVAILABLE, rpc
    # Clients get a fixed message and the request id; the rank's remote traceback (pids, addresses,
    # paths) stays in the gateway's log under that id.
    request_id = http.headers["x-request-id"]
    for said in (http.json()["error"]["message"], rpc.details()):
        assert "request id" in said and not any(word in said for word in ("Traceback", "pid", "127.0.0.1", ".py")), said
    assert f"(request id {request_id})" in http.json()["error"]["message"]

    # Serve's health check sees the failed group and replaces the whole replica.
    deadline = time.monotonic() + 180
    while True:
        response = completion(endpoints.http, 4)
        if response.status_code == 200:
            break
        assert response.status_code == 503, response.text
        assert time.monotonic() < deadline, "no working replica came back"
        time.sleep(0.5)
    assert response.json()["choices"][0]["finish_reason"] == "length"
    fresh = model_server.stats.remote().result()
    assert fresh.state == "healthy" and {r.pid for r in fresh.ranks}.isdisjoint({r.pid for r in stats.ranks})
