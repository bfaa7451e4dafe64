"""API keys: the key sources (unit), then a served app with keys: 401 / UNAUTHENTICATED for missing,
wrong and revoked keys on HTTP and gRPC, health closed when asked, the prefix cache kept apart per
tenant, and no key text in any log."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import grpc
import pytest
import requests
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gptoss.errors import AuthenticationError
from serve.auth import ApiKeys, ApiKeysError, parse_keys
from serve.proto.gptoss.v1 import gptoss_pb2 as pb
from serve.proto.gptoss.v1 import gptoss_pb2_grpc as pb_grpc
from tests.conftest import SERVE_TEST_CONFIG

KEY_A = "sk-alpha-7f3c2b9e4d1a"
KEY_A2 = "sk-alpha-second-0c8d"  # a second key of tenant alpha (rotation: old and new side by side)
KEY_B = "sk-beta-5e6f7a8b9c0d"
APP = "secured"
STORE_ENTRIES = 3  # stored responses the app keeps


# --- the key sources -------------------------------------------------------------------------------


def test_a_keys_file_gives_each_key_its_tenant_and_comments_and_blank_lines_are_skipped(tmp_path):
    path = tmp_path / "keys"
    path.write_text(f"# tenants\nalpha {KEY_A}\nalpha {KEY_A2}  # rotated in\n\n{KEY_B}\n")
    keys = ApiKeys(str(path), None)
    assert keys.check(KEY_A) == keys.check(KEY_A2) == "alpha"
    tenant_b = keys.check(KEY_B)
    assert tenant_b.startswith("key-") and KEY_B not in tenant_b  # a key of its own tenant, not named by its text
    for credential in (None, "", "sk-unknown", KEY_A + " "):
        with pytest.raises(AuthenticationError):
            keys.check(credential)


def test_a_changed_keys_file_is_read_again_and_a_removed_key_stops_working(tmp_path):
    path = tmp_path / "keys"
    path.write_text(f"{KEY_A}\n{KEY_B}\n")
    keys = ApiKeys(str(path), None, reload_period_s=0.01)
    keys.check(KEY_B)
    path.write_text(f"{KEY_A}\n")
    time.sleep(0.05)
    with pytest.raises(AuthenticationError, match="not valid"):
        keys.check(KEY_B)
    assert keys.check(KEY_A)
    path.write_text("this line has three fields\n")  # a broken rewrite keeps the previous keys
    time.sleep(0.05)
    assert keys.check(KEY_A)


def test_keys_from_an_environment_variable_split_on_commas_and_newlines(monkeypatch):
    monkeypatch.setenv("GPTOSS_TEST_KEYS", f"{KEY_A}, {KEY_B}\n{KEY_A2}")
    keys = ApiKeys(None, "GPTOSS_TEST_KEYS")
    assert len({keys.check(k) for k in (KEY_A, KEY_B, KEY_A2)}) == 3


def test_unusable_key_sources_are_refused_at_start_without_quoting_keys(tmp_path, monkeypatch):
    monkeypatch.delenv("GPTOSS_NO_SUCH_VAR", raising=False)
    with pytest.raises(ApiKeysError, match="GPTOSS_NO_SUCH_VAR"):
        ApiKeys(None, "GPTOSS_NO_SUCH_VAR")
    (tmp_path / "empty").write_text("# nothing\n")
    with pytest.raises(ApiKeysError, match="hold no key"):
        ApiKeys(str(tmp_path / "empty"), None)
    with pytest.raises(ApiKeysError, match="cannot read"):
        ApiKeys(str(tmp_path / "absent"), None)
    with pytest.raises(ApiKeysError, match="line 2") as error:
        parse_keys(f"{KEY_A}\nalpha beta {KEY_B}\n", "keys")
    assert KEY_B not in str(error.value)


# --- a served app with keys --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def secured(serve_instance, tiny_checkpoint, tmp_path_factory):
    from ray import serve

    from serve.app import build_app_from_config
    from serve.config import parse_config

    keys_file = tmp_path_factory.mktemp("keys") / "api_keys"
    keys_file.write_text(f"alpha {KEY_A}\nbeta {KEY_B}\n")
    raw = {**SERVE_TEST_CONFIG, "model": {**SERVE_TEST_CONFIG["model"], "checkpoint": str(tiny_checkpoint),
                                          "name": APP},
           "auth": {"api_keys_file": str(keys_file), "reload_period_s": 0.2, "public_health": False},
           "gateway": {**SERVE_TEST_CONFIG["gateway"], "response_store_entries": STORE_ENTRIES}}
    serve.run(build_app_from_config(parse_config(raw)), name=APP, route_prefix=f"/{APP}")
    yield serve_instance, keys_file
    serve.delete(APP)


def post(endpoints, path: str, key: str | None, body: dict) -> requests.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return requests.post(f"{endpoints.http}/{APP}/v1/{path}", json=body, headers=headers, timeout=60)


def grpc_generate(endpoints, key: str | None, ids: list[int]):
    metadata = [("application", APP)] + ([("authorization", f"Bearer {key}")] if key else [])
    request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=ids), sampling=pb.SamplingParams(max_tokens=3))
    with grpc.insecure_channel(endpoints.grpc) as channel:
        return list(pb_grpc.GptossServiceStub(channel).Generate(request, metadata=metadata, timeout=60))


COMPLETION = {"prompt": [11, 12, 13, 14], "max_tokens": 3, "temperature": 0}


@pytest.mark.parametrize("key", [None, "sk-wrong", KEY_A.upper()], ids=["missing", "wrong", "wrong-case"])
def test_http_and_grpc_refuse_a_missing_or_wrong_key(secured, key):
    endpoints, _ = secured
    for path, body in (("completions", COMPLETION),
                       ("chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})):
        response = post(endpoints, path, key, body)
        assert response.status_code == 401, response.text
        assert response.json()["error"]["type"] == "authentication_error"
    models = requests.get(f"{endpoints.http}/{APP}/v1/models", timeout=30,
                          headers={"Authorization": f"Bearer {key}"} if key else {})
    assert models.status_code == 401
    with pytest.raises(grpc.RpcError) as error:
        grpc_generate(endpoints, key, [11, 12, 13])
    assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_the_right_key_works_on_http_and_grpc_and_health_asks_for_one_when_not_public(secured):
    endpoints, _ = secured
    for path in ("docs", "redoc", "openapi.json"):  # a keyed server does not describe itself to strangers
        assert requests.get(f"{endpoints.http}/{APP}/{path}", timeout=30).status_code == 404
    assert requests.get(f"{endpoints.http}/{APP}/metrics", timeout=30).status_code == 401
    assert requests.get(f"{endpoints.http}/{APP}/metrics", timeout=30,
                        headers={"Authorization": f"Bearer {KEY_A}"}).status_code == 200
    response = post(endpoints, "completions", KEY_A, COMPLETION)
    assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 3
    assert grpc_generate(endpoints, KEY_B, [11, 12, 13])[-1].usage.completion_tokens == 3
    assert requests.get(f"{endpoints.http}/{APP}/health", timeout=30).status_code == 401
    assert requests.get(f"{endpoints.http}/{APP}/health", timeout=30,
                        headers={"Authorization": f"Bearer {KEY_A}"}).status_code == 200
    with grpc.insecure_channel(endpoints.grpc) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        with pytest.raises(grpc.RpcError) as error:
            health.Check(health_pb2.HealthCheckRequest(), metadata=[("application", APP)], timeout=30)
        assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
        reply = health.Check(health_pb2.HealthCheckRequest(), timeout=30,
                             metadata=[("application", APP), ("authorization", f"Bearer {KEY_A}")])
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_the_same_prompt_from_two_tenants_shares_no_cached_block(secured):
    endpoints, _ = secured
    prompt = {"prompt": list(range(2000, 2100)), "max_tokens": 2, "temperature": 0}

    def cached(key):
        response = post(endpoints, "completions", key, prompt)
        assert response.status_code == 200, response.text
        return response.json()["usage"]["prompt_tokens_details"]["cached_tokens"]

    assert cached(KEY_A) == 0
    assert cached(KEY_B) == 0  # beta's first look at alpha's prompt: nothing cached for beta
    assert cached(KEY_A) == 96  # alpha again: its own 6 full blocks of 16
    assert cached(KEY_B) == 96


def test_a_stored_response_is_its_tenants_alone_and_the_least_recently_used_is_evicted(secured):
    endpoints, _ = secured

    def respond(key, **fields):
        return post(endpoints, "responses", key, {"input": "hi", "max_output_tokens": 2, **fields})

    def fetch(key, response_id):
        return requests.get(f"{endpoints.http}/{APP}/v1/responses/{response_id}", timeout=30,
                            headers={"Authorization": f"Bearer {key}"})

    alphas = [respond(KEY_A).json()["id"] for _ in range(STORE_ENTRIES)]
    assert fetch(KEY_A, alphas[0]).status_code == 200  # alphas[0] is now the most recently used
    for attempt in (fetch(KEY_B, alphas[0]), respond(KEY_B, previous_response_id=alphas[0]),
                    requests.delete(f"{endpoints.http}/{APP}/v1/responses/{alphas[0]}", timeout=30,
                                    headers={"Authorization": f"Bearer {KEY_B}"})):
        assert attempt.status_code == 404 and alphas[0] in attempt.text, attempt.text  # as if unknown
    beta = respond(KEY_B).json()["id"]  # one more: evicts the least recently used, alphas[1]
    missing = fetch(KEY_A, alphas[1])
    assert missing.status_code == 404 and alphas[1] in missing.json()["error"]["message"]
    assert [fetch(KEY_A, i).status_code for i in (alphas[0], alphas[2])] == [200, 200]
    assert respond(KEY_A, previous_response_id=alphas[1]).status_code == 404
    assert fetch(KEY_B, beta).status_code == 200


def test_stored_responses_outlive_a_gateway_replica(secured):
    import os
    import signal

    from ray.util.state import list_actors

    endpoints, _ = secured
    headers = {"Authorization": f"Bearer {KEY_A}"}
    stored = post(endpoints, "responses", KEY_A, {"input": "hi", "max_output_tokens": 2}).json()["id"]
    [gateway] = [a.pid for a in list_actors(filters=[("state", "=", "ALIVE")], limit=1000)
                 if a.class_name.startswith(f"ServeReplica:{APP}:Gateway")]
    os.kill(gateway, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while True:  # Serve replaces the replica; until then the proxy answers 503 or the connection fails
        with contextlib.suppress(requests.RequestException):
            response = requests.get(f"{endpoints.http}/{APP}/v1/responses/{stored}", headers=headers, timeout=10)
            if response.status_code == 200:
                break
            assert response.status_code >= 500, response.text  # never a 404: the store kept it
        assert time.monotonic() < deadline, "the response was not found after the gateway's restart"
        time.sleep(0.5)
    assert response.json()["id"] == stored


def test_a_key_removed_from_the_file_is_refused_within_the_reload_period(secured):
    endpoints, keys_file = secured
    assert post(endpoints, "completions", KEY_B, COMPLETION).status_code == 200
    keys_file.write_text(f"alpha {KEY_A}\n")
    deadline = time.monotonic() + 30
    while post(endpoints, "completions", KEY_B, COMPLETION).status_code != 401:
        assert time.monotonic() < deadline, "the revoked key still works"
        time.sleep(0.2)
    assert post(endpoints, "completions", KEY_A, COMPLETION).status_code == 200
    keys_file.write_text(f"alpha {KEY_A}\nbeta {KEY_B}\n")  # restored for the other tests


def test_no_key_text_reaches_any_log(secured, ray_cluster):
    endpoints, _ = secured
    post(endpoints, "completions", "sk-leaked-if-logged-123", COMPLETION)  # a wrong key, logged or not
    log_dirs = {Path(node.get_logs_dir_path()) for node in [ray_cluster.head_node, *ray_cluster.worker_nodes]}
    files = [f for d in log_dirs for f in d.rglob("*") if f.is_file()]
    assert any("Gateway" in f.name or "serve" in str(f) for f in files), "no Serve logs found to check"
    for f in files:
        data = f.read_bytes()
        for secret in (KEY_A, KEY_A2, KEY_B, "sk-leaked-if-logged-123"):
            assert secret.encode() not in data, f"{secret} appears in {f}"
