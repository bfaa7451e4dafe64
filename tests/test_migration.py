"""No request lost, on a fleet of two groups behind two gateway replicas: aborts reach the gateway that runs
the request and belong to their tenant; a streaming `timeout` ends in-band; a request that breaks its
step fails alone after one group failure; a stream that breaks more often than `gateway.max_migrations`
ends with the error; and a scale-down moves the removed group's streams instead of cutting them.
(The kill-a-rank migration with token identity is in tests/test_fleet.py.)"""

from __future__ import annotations

import json
import os
import random
import signal
import threading
import time

import grpc
import pytest
import requests
from ray import serve

from serve.proto.gptoss.v1 import gptoss_pb2 as pb
from serve.proto.gptoss.v1 import gptoss_pb2_grpc as pb_grpc
from tests.conftest import FAULT_TOKEN, SERVE_TEST_CONFIG
from tests.serve_helpers import metric_total, replica_stats

APP = "pair"
KEY_A, KEY_B = "sk-tenant-alpha-0123456789", "sk-tenant-beta-9876543210"


def app_config(checkpoint, app: str, model_server: dict, gateway: dict, auth: dict | None = None):
    from serve.config import parse_config

    return parse_config({
        **SERVE_TEST_CONFIG,
        "model": {**SERVE_TEST_CONFIG["model"], "checkpoint": str(checkpoint), "name": app},
        "model_server": {**SERVE_TEST_CONFIG["model_server"], "stats_period_s": 0.5, "graceful_shutdown_timeout_s": 6,
                         "drain_grace_s": 1, **model_server},
        "gateway": {**SERVE_TEST_CONFIG["gateway"], **gateway},
        **({"auth": auth} if auth else {})})


@pytest.fixture(scope="module")
def pair(serve_instance, tiny_checkpoint, tmp_path_factory):
    """Two groups (G=1), two gateway replicas, two tenants, at most one move per choice."""
    from serve.app import MODEL_SERVER_NAME, build_app_from_config

    keys = tmp_path_factory.mktemp("pair-keys") / "keys"
    keys.write_text(f"alpha {KEY_A}\nbeta {KEY_B}\n")
    config = app_config(checkpoint=tiny_checkpoint, app=APP, model_server={"num_replicas": 2},
                        gateway={"num_replicas": 2, "max_migrations": 1}, auth={"api_keys_file": str(keys)})
    serve.run(build_app_from_config(config), name=APP, route_prefix=f"/{APP}")
    handle = serve.get_deployment_handle(MODEL_SERVER_NAME, app_name=APP)
    replica_stats(handle, num_replicas=2, healthy=True)
    yield serve_instance, handle
    serve.delete(APP)


def metadata(key: str) -> list[tuple[str, str]]:
    return [("application", APP), ("authorization", f"Bearer {key}")]


def long_generate(stub, key: str, request_id: str, seed: int = 0):
    """A long sampled Generate call, started: (the call, its first message)."""
    call = stub.Generate(pb.GenerateRequest(request_id=request_id, token_ids=pb.TokenIds(ids=[5, 6, 7, seed + 8]),
                                            sampling=pb.SamplingParams(max_tokens=1900, temperature=1, seed=seed)),
                         metadata=metadata(key), timeout=120)
    return call, next(call)


def test_abort_reaches_whichever_gateway_runs_the_request_and_only_its_tenant_may_send_it(pair):
    endpoints, _ = pair
    with grpc.insecure_channel(endpoints.grpc) as channel:
        stub = pb_grpc.GptossServiceStub(channel)
        landed = 0
        for i in range(20):  # Serve routes Generate and Abort to either gateway replica
            call, _ = long_generate(stub, KEY_A, f"job-{i}", seed=i)
            reply = stub.Abort(pb.AbortRequest(request_id=f"job-{i}"), metadata=metadata(KEY_A), timeout=60)
            finish = [m.finish_reason for m in call if m.finish_reason]
            landed += reply.aborted and finish == [pb.FINISH_REASON_ABORT]
        assert landed == 20

        # Two tenants may run the same id at once; one cannot end (nor see) the other's.
        mine, _ = long_generate(stub, KEY_A, "shared-id", seed=1)
        theirs, _ = long_generate(stub, KEY_B, "shared-id", seed=2)
        assert not stub.Abort(pb.AbortRequest(request_id="only-alpha-has-this"), metadata=metadata(KEY_B),
                              timeout=60).aborted
        assert stub.Abort(pb.AbortRequest(request_id="shared-id"), metadata=metadata(KEY_B), timeout=60).aborted
        assert [m.finish_reason for m in theirs if m.finish_reason] == [pb.FINISH_REASON_ABORT]
        assert next(mine).finish_reason == pb.FINISH_REASON_UNSPECIFIED  # alpha's runs on
        assert stub.Abort(pb.AbortRequest(request_id="shared-id"), metadata=metadata(KEY_A), timeout=60).aborted
        assert [m.finish_reason for m in mine if m.finish_reason] == [pb.FINISH_REASON_ABORT]


def kv_settles(handle, timeout_s: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        stats = replica_stats(handle, num_replicas=2, timeout_s=10)
        if all(s.num_running == 0 and s.num_kv_blocks_used == 0 for s in stats.values()):
            return True
        time.sleep(0.1)
    return False


def test_a_streaming_timeout_ends_in_band_and_frees_the_request(pair):
    """The timeout fires in the task that sends the stream (not the handler's, which has returned)."""
    endpoints, handle = pair
    body = {"prompt": [9, 10, 11], "max_tokens": 1900, "temperature": 1, "seed": 3, "stream": True, "timeout": 1.0}
    started = time.monotonic()
    with requests.post(f"{endpoints.http}/{APP}/v1/completions", json=body, stream=True, timeout=60,
                       headers={"Authorization": f"Bearer {KEY_A}"}) as response:
        lines = [line for line in response.iter_lines() if line]
    assert response.status_code == 200 and time.monotonic() - started < 30
    error = json.loads(lines[-2][6:])["error"]
    assert error["type"] == "timeout_error" and "timeout of 1 s" in error["message"] and lines[-1] == b"data: [DONE]"
    assert kv_settles(handle)


def completion(endpoints, prompt: list[int], max_tokens: int, stream: bool = False, **fields):
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": stream} | fields
    return requests.post(f"{endpoints.http}/{APP}/v1/completions", json=body, stream=stream, timeout=300,
                         headers={"Authorization": f"Bearer {KEY_A}"})


def stream_outcome(response) -> dict:
    outcome = {"text": "", "finish": None, "error": None}
    for line in response.iter_lines():
        if line.startswith(b"data: {"):
            event = json.loads(line[6:])
            outcome["error"] = event.get("error") or outcome["error"]
            for choice in event.get("choices", []):
                outcome["text"] += choice["text"]
                outcome["finish"] = choice["finish_reason"] or outcome["finish"]
    return outcome


def test_a_request_that_breaks_its_step_fails_alone_after_one_group_failure(pair):
    """Its group fails (and the streams beside it there move on); it is not sent to the other group, which
    it would fail too, so the other group keeps serving."""
    endpoints, handle = pair
    before = replica_stats(handle, num_replicas=2, healthy=True)
    results: dict = {}

    def beside(i: int) -> None:
        with completion(endpoints, [200 + i, 7, 8], 400, stream=True, temperature=1, seed=i) as response:
            results[i] = stream_outcome(response)

    threads = [threading.Thread(target=beside, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    time.sleep(1.0)
    poison = completion(endpoints, [FAULT_TOKEN, 5, 6], 8)
    for thread in threads:
        thread.join(300)
    assert poison.status_code == 500 and "not sent to another group" in poison.json()["error"]["message"]
    assert all(r["error"] is None and r["finish"] == "length" for r in results.values()), results
    after = replica_stats(handle, num_replicas=2, healthy=True, timeout_s=120)
    assert len(set(before) & set(after)) == 1  # one group failed (and was replaced), the other kept serving


def test_a_stream_that_breaks_more_often_than_max_migrations_ends_with_the_error(pair):
    endpoints, handle = pair
    stats = replica_stats(handle, num_replicas=2, healthy=True, timeout_s=120)
    outcome: dict = {}
    started = threading.Event()

    def run() -> None:
        with completion(endpoints, [33, 34, 35], 1900, stream=True, temperature=1, seed=7) as response:
            replica = response.headers["x-gptoss-replica"]
            outcome["replica"] = replica
            started.set()
            outcome.update(stream_outcome(response))

    thread = threading.Thread(target=run)
    thread.start()
    assert started.wait(60)
    first = outcome["replica"]
    os.kill(stats[first].ranks[0].pid, signal.SIGKILL)  # it moves to the other group (its one move)
    time.sleep(2.0)
    other = next(rid for rid in stats if rid != first)
    os.kill(stats[other].ranks[0].pid, signal.SIGKILL)  # and breaks again there
    thread.join(300)
    assert outcome["error"] is not None and outcome["error"]["type"] == "server_error", outcome
    assert outcome["finish"] is None and outcome["text"]  # it had streamed tokens before the end
    replica_stats(handle, num_replicas=2, healthy=True, timeout_s=180)  # Serve brings both groups back


def test_a_scale_down_moves_the_removed_groups_streams_instead_of_cutting_them(serve_instance, tiny_checkpoint):
    """Serve's autoscaler removes one of two groups while four long streams run, two on each. The removed
    replica's streams get drain_grace_s (1 s) to finish, then move: all four end with every token, though
    they run on past the removed replica's graceful_shutdown_timeout_s (4 s here). The autoscaler may
    remove the group downscale_delay_s after the app is up, idle: 4 s leaves the streams time to start
    on both groups first on a loaded machine (2 s did not, once in a fresh clone's full run)."""
    from serve.app import MODEL_SERVER_NAME, build_app_from_config

    config = app_config(tiny_checkpoint, "shrink", gateway={}, model_server={
        "graceful_shutdown_timeout_s": 4, "autoscaling": {
            "min_replicas": 1, "max_replicas": 2, "initial_replicas": 2, "target_ongoing_requests": 8,
            "upscale_delay_s": 600, "downscale_delay_s": 4, "look_back_period_s": 1}})
    serve.run(build_app_from_config(config), name="shrink", route_prefix="/shrink")
    try:
        results: dict = {}
        rng = random.Random(11)

        def run(i: int) -> None:
            body = {"prompt": [rng.randrange(1000, 199000) for _ in range(20)], "max_tokens": 640,
                    "temperature": 1, "stream": True}
            started_at = time.monotonic()
            with requests.post(f"{serve_instance.http}/shrink/v1/completions", json=body, stream=True,
                               timeout=300) as response:
                results[i] = stream_outcome(response) | {"replica": response.headers.get("x-gptoss-replica"),
                                                         "took_s": time.monotonic() - started_at}

        threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(300)
        assert all(r["error"] is None and r["finish"] == "length" for r in results.values()), results
        assert len({r["replica"] for r in results.values()}) == 2  # they started on both groups
        deployment = serve.status().applications["shrink"].deployments["ModelServer"]
        states = {str(getattr(state, "value", state)): n for state, n in deployment.replica_states.items()}
        assert states.get("RUNNING") == 1  # one group was removed meanwhile
        assert min(r["took_s"] for r in results.values()) > 4 + 4  # past the delay and the graceful timeout
        # Every stream that started on the removed group moved (the router may have put 1 to 3 there): as a
        # drain, or, where the news of the removal reached the gateway after Serve stopped the replica (seen
        # once under load, in a fresh clone's first run), as a failure. Either way none was cut.
        remaining = replica_stats(serve.get_deployment_handle(MODEL_SERVER_NAME, app_name="shrink"), num_replicas=1)
        removed = {r["replica"] for r in results.values()} - set(remaining)
        started_there = sum(r["replica"] in removed for r in results.values())
        assert metric_total(f"{serve_instance.http}/shrink/metrics", "ray_gptoss_migrations_total",
                            'reason="', at_least=started_there, timeout_s=60) >= started_there >= 1
    finally:
        serve.delete("shrink")
