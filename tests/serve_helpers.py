"""Helpers of the serving tests that run against a Serve app (no fixtures here)."""

from __future__ import annotations

import json
import threading
import time

import requests


def replica_stats(handle, num_replicas: int = 2, timeout_s: float = 60.0, healthy: bool = False) -> dict:
    """Each replica's GroupStats by replica id, asked until `num_replicas` distinct replicas (healthy ones,
    if asked) have answered: the handle's router picks one replica per call."""
    seen: dict = {}
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            stats = handle.stats.remote().result(timeout_s=10)
            if not healthy or stats.state == "healthy":
                seen[stats.name.removeprefix("group-")] = stats
        except Exception:  # noqa: BLE001 - a replica being replaced; ask again
            pass
        if len(seen) >= num_replicas:
            return seen
        assert time.monotonic() < deadline, f"only {sorted(seen)} of {num_replicas} replicas answered"
        time.sleep(0.05)


def stream_completion(url: str, prompt: list[int], max_tokens: int, results: dict, key: str,
                      started: threading.Event) -> None:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    with requests.post(f"{url}/completions", json=body, stream=True, timeout=120) as response:
        outcome = {"replica": response.headers.get("x-gptoss-replica"), "status": response.status_code,
                   "finish": None, "error": None, "tokens": 0}
        results[key] = outcome
        started.set()
        for line in response.iter_lines():
            if not line.startswith(b"data: {"):
                continue
            event = json.loads(line[6:])
            if "error" in event:
                outcome["error"] = event["error"]
            for choice in event.get("choices", []):
                outcome["finish"] = choice["finish_reason"] or outcome["finish"]
            if event.get("usage"):
                outcome["tokens"] = event["usage"]["completion_tokens"]


def metric_total(url: str, name: str, label: str, at_least: float = 1.0, timeout_s: float = 30.0) -> float:
    """The sum of a metric's samples with `label` on a Prometheus page, once it reaches `at_least` or at
    the timeout (polled: Ray's exporter reports every second or so, one series at a time)."""
    deadline = time.monotonic() + timeout_s
    while True:
        page = requests.get(url, timeout=30).text
        total = sum(float(line.rsplit(" ", 1)[1]) for line in page.splitlines()
                    if line.startswith(name) and label in line)
        if total >= at_least or time.monotonic() > deadline:
            return total
        time.sleep(1)
