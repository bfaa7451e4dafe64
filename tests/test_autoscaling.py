"""Autoscaling in whole EP groups: load raises the group count from 1 to 2, the new group serves once it
is up, and when the load goes the count falls back to 1 while streams opened before the downscale
(one on each group) finish with all their tokens; no request fails during either change."""

from __future__ import annotations

import random
import threading
import time

import pytest
import requests

from tests.conftest import SERVE_TEST_CONFIG
from tests.serve_helpers import stream_completion

APP = "autoscaled"


@pytest.fixture(scope="module")
def autoscaled(serve_instance, tiny_checkpoint):
    from ray import serve

    from serve.app import build_app_from_config
    from serve.config import parse_config

    raw = {**SERVE_TEST_CONFIG,
           "model": {**SERVE_TEST_CONFIG["model"], "checkpoint": str(tiny_checkpoint), "name": APP},
           "model_server": {**SERVE_TEST_CONFIG["model_server"], "stats_period_s": 0.5,
                            "graceful_shutdown_timeout_s": 60,
                            "autoscaling": {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 2,
                                            "upscale_delay_s": 0.5, "downscale_delay_s": 4,
                                            "look_back_period_s": 1}}}
    serve.run(build_app_from_config(parse_config(raw)), name=APP, route_prefix=f"/{APP}")
    yield f"{serve_instance.http}/{APP}/v1"
    serve.delete(APP)


def running_groups() -> int:
    from ray import serve

    return serve.status().applications[APP].deployments["ModelServer"].replica_states.get("RUNNING", 0)


def wait_for(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.25)


def test_load_adds_a_group_and_its_absence_removes_one_without_failing_a_request(autoscaled):
    assert running_groups() == 1
    stop = threading.Event()
    outcomes: list[tuple[int, str | None]] = []

    def client(seed: int) -> None:
        rng = random.Random(seed)
        while not stop.is_set():
            body = {"prompt": [rng.randrange(1000, 199000) for _ in range(24)], "max_tokens": 48, "temperature": 0}
            response = requests.post(f"{autoscaled}/completions", json=body, timeout=120)
            outcomes.append((response.status_code, response.headers.get("x-gptoss-replica")))
            assert response.status_code == 200, response.text
            assert response.json()["usage"]["completion_tokens"] == 48

    clients = [threading.Thread(target=client, args=(seed,)) for seed in range(6)]
    for thread in clients:
        thread.start()
    wait_for(lambda: running_groups() == 2, 180, "a second group under load")
    # The new group joins the routing once it is up: requests land on it.
    wait_for(lambda: len({replica for _, replica in outcomes}) == 2, 60, "requests on the new group")
    stop.set()
    for thread in clients:
        thread.join(120)
    assert all(status == 200 for status, _ in outcomes)

    # Two long streams, opened before the downscale: the idle-looking fleet spreads them over both groups.
    results: dict = {}
    streams = []
    for i in range(2):
        started = threading.Event()
        prompt = [random.Random(50 + i).randrange(1000, 199000) for _ in range(24)]
        thread = threading.Thread(target=stream_completion, args=(autoscaled, prompt, 400, results, f"s{i}", started))
        thread.start()
        assert started.wait(60)
        streams.append(thread)
    assert len({r["replica"] for r in results.values()}) == 2, results
    wait_for(lambda: running_groups() == 1, 180, "the load's absence to remove a group")
    for thread in streams:
        thread.join(180)
    for outcome in results.values():  # including the one on the group that was removed
        assert outcome["error"] is None and outcome["finish"] == "length" and outcome["tokens"] == 400, outcome
    after = requests.post(f"{autoscaled}/completions", json={"prompt": [5, 6, 7], "max_tokens": 3}, timeout=60)
    assert after.status_code == 200
