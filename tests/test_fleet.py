"""A fleet of EP groups behind one gateway, on the simulated two-node cluster: prefix-affinity routing
against Serve's default router (on the prefix-cache hit counters), a hot prefix spilling over, a group
failing while the other serves, a bounded soak of 500 concurrent requests with disconnects, aborts and
malformed bodies, and the Prometheus metrics all that leaves behind."""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import signal
import threading
import time
import urllib.request
from collections import Counter
from types import SimpleNamespace

import aiohttp
import grpc
import openai
import pytest
import ray
import requests

from serve.proto.gptoss.v1 import gptoss_pb2 as pb
from serve.proto.gptoss.v1 import gptoss_pb2_grpc as pb_grpc
from tests.conftest import SERVE_TEST_CONFIG
from tests.serve_helpers import metric_total, replica_stats

APP = "fleet"
MODEL = "fleet-test"


def fleet_config(checkpoint, policy: str):
    from serve.config import parse_config

    return parse_config({
        **SERVE_TEST_CONFIG,
        "model": {**SERVE_TEST_CONFIG["model"], "checkpoint": str(checkpoint), "name": MODEL},
        "engine": {**SERVE_TEST_CONFIG["engine"], "kv_cache_gib": 0.05},
        "model_server": {**SERVE_TEST_CONFIG["model_server"], "num_replicas": 2, "stats_period_s": 0.5,
                         "router": {"policy": policy, "max_extra_requests": 4}},
    })


def deploy(config, app: str):
    from ray import serve

    from serve.app import MODEL_SERVER_NAME, build_app_from_config

    serve.run(build_app_from_config(config), name=app, route_prefix=f"/{app}")
    return serve.get_deployment_handle(MODEL_SERVER_NAME, app_name=app)


@pytest.fixture(scope="module")
def fleet(serve_instance, tiny_checkpoint):
    from ray import serve

    handle = deploy(fleet_config(tiny_checkpoint, "prefix_affinity"), APP)
    yield SimpleNamespace(http=serve_instance.http, url=f"{serve_instance.http}/{APP}/v1", grpc=serve_instance.grpc,
                          handle=handle)
    serve.delete(APP)


# --- routing -----------------------------------------------------------------------------------------


def conversations(num: int, turns: int, seed: int, prefix_len: int = 160, turn_len: int = 48) -> list[list[list[int]]]:
    """Token-id conversations: a long prefix of their own, then a user turn more at each request."""
    rng = random.Random(seed)
    result = []
    for _ in range(num):
        prompt = [rng.randrange(1000, 199000) for _ in range(prefix_len)]
        conversation = []
        for _ in range(turns):
            prompt = prompt + [rng.randrange(1000, 199000) for _ in range(turn_len)]
            conversation.append(prompt)
        result.append(conversation)
    return result


async def run_conversations(base_url: str, convs) -> list[tuple[int, int, str]]:
    """(prompt tokens, cached tokens, replica) of every request, in rounds: every conversation's turn t at
    once, then turn t + 1. So each request is routed while both groups are equally busy; with one
    closed loop per conversation, Serve's queue-length choice would send a turn back to the group that
    had just finished the previous one, whatever the router, and the comparison would be luck."""
    client = openai.AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=120)

    async def one(prompt):
        raw = await client.completions.with_raw_response.create(model=MODEL, prompt=prompt, max_tokens=2,
                                                                temperature=0)
        usage = raw.parse().usage
        return usage.prompt_tokens, usage.prompt_tokens_details.cached_tokens, raw.headers["x-gptoss-replica"]

    rows = []
    try:
        for turn in range(len(convs[0])):
            # Sent in a new order each round: a router that balances by arrival order alone must not
            # land each conversation on the same group again.
            order = random.Random(turn).sample(range(len(convs)), len(convs))
            rows += await asyncio.gather(*(one(convs[i][turn]) for i in order))
        return rows
    finally:
        await client.close()


def hit_rate(rows) -> float:
    return sum(cached for _, cached, _ in rows) / sum(prompt for prompt, _, _ in rows)


def test_prefix_affinity_gets_a_higher_prefix_cache_hit_rate_than_serves_default_router(fleet, serve_instance,
                                                                                        tiny_checkpoint):
    from ray import serve

    convs = conversations(24, 3, seed=1)  # 48 follow-up turns: the default router's luck averages out
    # Every turn after the first could reuse all of the previous turn's prompt (lengths are whole blocks).
    ideal = sum(len(c[t - 1]) for c in convs for t in range(1, len(c))) / sum(len(p) for c in convs for p in c)
    deploy(fleet_config(tiny_checkpoint, "power_of_two"), "fleet-default")
    try:
        default = hit_rate(asyncio.run(run_conversations(f"{serve_instance.http}/fleet-default/v1", convs)))
    finally:
        serve.delete("fleet-default")
    rows = asyncio.run(run_conversations(fleet.url, convs))
    ours = hit_rate(rows)
    assert ours >= 0.8 * ideal, (ours, ideal)  # the load bound spills a few turns of a round sent at once
    assert ours >= 1.2 * default, (ours, default)
    assert len({replica for _, _, replica in rows}) == 2  # conversations were spread over both groups


def test_a_hot_prefix_under_heavy_load_spills_to_the_other_group(fleet):
    prefix = [random.Random(2).randrange(1000, 199000) for _ in range(192)]
    first = requests.post(f"{fleet.url}/completions", json={"prompt": prefix + [1], "max_tokens": 1}, timeout=60)
    home = first.headers["x-gptoss-replica"]

    async def burst():
        async with aiohttp.ClientSession() as session:
            async def one(i):
                body = {"prompt": prefix + [2, i], "max_tokens": 48, "temperature": 0}
                async with session.post(f"{fleet.url}/completions", json=body) as response:
                    assert response.status == 200, await response.text()
                    usage = (await response.json())["usage"]
                    return response.headers["x-gptoss-replica"], usage["prompt_tokens_details"]["cached_tokens"]

            return await asyncio.gather(*(one(i) for i in range(24)))

    served = asyncio.run(burst())
    counts = Counter(replica for replica, _ in served)
    assert len(counts) == 2, counts  # the load won over affinity for part of the burst
    assert counts[home] >= 5, counts  # but the group holding the prefix took requests until it was busier
    assert all(cached >= 192 for replica, cached in served if replica == home)


# --- a group fails while the other serves ------------------------------------------------------------


def http_text(url: str, prompt: list[int], body: dict, results: dict, key: str, started: threading.Event) -> None:
    """A completion's texts by choice, finish reasons, usage and error (streamed when body["stream"])."""
    request = {"prompt": prompt, "temperature": 0} | body
    if request.get("stream"):
        request["stream_options"] = {"include_usage": True}
    outcome = results[key] = {"texts": {}, "finish": {}, "usage": None, "error": None}
    if not request.get("stream"):
        started.set()  # its reply comes at the end: the caller watches the groups' open streams instead
    with requests.post(f"{url}/completions", json=request, stream=request.get("stream", False), timeout=300) as r:
        started.set()
        if not request.get("stream"):
            reply = r.json()
            outcome["error"] = reply.get("error")
            for choice in reply.get("choices", []):
                outcome["texts"][choice["index"]] = choice["text"]
                outcome["finish"][choice["index"]] = choice["finish_reason"]
            outcome["usage"] = reply.get("usage")
            return
        for line in r.iter_lines():
            if not line.startswith(b"data: {"):
                continue
            event = json.loads(line[6:])
            outcome["error"] = event.get("error") or outcome["error"]
            for choice in event.get("choices", []):
                outcome["texts"][choice["index"]] = outcome["texts"].get(choice["index"], "") + choice["text"]
                outcome["finish"][choice["index"]] = choice["finish_reason"] or outcome["finish"].get(choice["index"])
            outcome["usage"] = event.get("usage") or outcome["usage"]


def grpc_tokens(address: str, prompt: list[int], max_tokens: int, results: dict, key: str,
                started: threading.Event) -> None:
    request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompt), sampling=pb.SamplingParams(max_tokens=max_tokens,
                                                                                               temperature=0))
    outcome = results[key] = {"tokens": [], "finish": None, "usage": None, "error": None}
    with grpc.insecure_channel(address) as channel:
        try:
            for reply in pb_grpc.GptossServiceStub(channel).Generate(request, metadata=[("application", APP)],
                                                                     timeout=300):
                started.set()
                outcome["tokens"] += reply.token_ids
                if reply.finish_reason:
                    outcome["finish"], outcome["usage"] = reply.finish_reason, reply.usage
        except grpc.RpcError as e:
            outcome["error"] = e


def test_a_killed_groups_streams_move_to_the_other_and_end_as_an_undisturbed_run_would(fleet, tiny_checkpoint):
    """Streams of every kind run on both groups; one group's rank is killed. Each of its streams moves to
    the other group with what it had generated: no client sees an error, the tokens (greedy, and seeded
    sampled with n = 2) are those of an undisturbed run, usage counts each token once, and new requests
    keep succeeding until Serve has replaced the group."""
    import torch

    import gptoss
    from engine import DEFAULT_STOP_TOKEN_IDS, Engine, EngineConfig, SamplingParams
    from gptoss.tokenizer import decode

    rng, n_tokens = random.Random(100), 400
    prompts = [[rng.randrange(1000, 199000) for _ in range(40)] for _ in range(8)]
    engine = Engine(gptoss.load_model(tiny_checkpoint, dtype=torch.float32), EngineConfig(num_kv_blocks=1024))
    plain = SamplingParams(max_tokens=n_tokens, temperature=0, stop_token_ids=())  # completions: no stop tokens
    expected = {f"http{i}": decode(list(c.token_ids)) for i, c in
                enumerate(engine.generate(prompts[:5], plain))}
    expected |= {f"grpc{i}": list(c.token_ids) for i, c in enumerate(engine.generate(
        prompts[5:7], SamplingParams(max_tokens=n_tokens, temperature=0, stop_token_ids=DEFAULT_STOP_TOKEN_IDS)), 5)}
    seeded = [SamplingParams(max_tokens=n_tokens, temperature=1.0, seed=5 + i, stop_token_ids=()) for i in range(2)]
    expected["sampled"] = [decode(list(c.token_ids)) for c in engine.generate([prompts[7]] * 2, seeded)]

    before = replica_stats(fleet.handle, healthy=True)
    results: dict = {}
    runs = [(http_text, (fleet.url, prompts[i], {"max_tokens": n_tokens, "stream": i < 3}), f"http{i}")
            for i in range(5)]
    runs += [(grpc_tokens, (fleet.grpc, prompts[i], n_tokens), f"grpc{i}") for i in (5, 6)]
    runs.append((http_text, (fleet.url, prompts[7], {"max_tokens": n_tokens, "stream": True, "n": 2,
                                                     "temperature": 1.0, "seed": 5}), "sampled"))
    threads = []
    for target, args, key in runs:
        started = threading.Event()
        threads.append(threading.Thread(target=target, args=(*args, results, key, started)))
        threads[-1].start()
        assert started.wait(60), key
    deadline = time.monotonic() + 60  # all 9 streams (n = 2 is two) open on the groups, none finished
    while sum(stats.num_open_streams for stats in replica_stats(fleet.handle).values()) < 9:
        assert time.monotonic() < deadline and all(thread.is_alive() for thread in threads), "streams did not open"
        time.sleep(0.05)
    victim = sorted(before)[0]
    os.kill(before[victim].ranks[0].pid, signal.SIGKILL)
    outcomes = []  # new requests from the moment of the kill: every one succeeds
    while any(thread.is_alive() for thread in threads) or len(outcomes) < 5:
        response = requests.post(f"{fleet.url}/completions", json={"prompt": [7, 8, 9], "max_tokens": 4}, timeout=60)
        outcomes.append(response.status_code)
    for thread in threads:
        thread.join(300)

    for i in range(5):
        outcome = results[f"http{i}"]
        assert outcome["error"] is None and outcome["finish"] == {0: "length"}, (i, outcome["error"])
        assert outcome["texts"][0] == expected[f"http{i}"], f"http{i}"
        assert (outcome["usage"]["prompt_tokens"], outcome["usage"]["completion_tokens"]) == (40, n_tokens)
    for i in (5, 6):
        outcome = results[f"grpc{i}"]
        assert outcome["error"] is None and outcome["tokens"] == expected[f"grpc{i}"], (i, outcome["error"])
        assert outcome["usage"].completion_tokens == len(expected[f"grpc{i}"]) and outcome["usage"].prompt_tokens == 40
    sampled = results["sampled"]
    assert sampled["error"] is None and [sampled["texts"][c] for c in (0, 1)] == expected["sampled"]
    assert sampled["usage"]["completion_tokens"] == 2 * n_tokens and sampled["usage"]["prompt_tokens"] == 40
    assert set(outcomes) == {200}, Counter(outcomes)
    moved = metric_total(f"{fleet.http}/{APP}/metrics", "ray_gptoss_migrations_total", 'reason="failure"')
    assert moved >= 1  # at least one stream was on the killed group (they were spread over both)
    after = replica_stats(fleet.handle, healthy=True, timeout_s=120)
    assert victim not in after and len(after) == 2


# --- soak --------------------------------------------------------------------------------------------


def process_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def serving_pids(handle) -> list[int]:
    from ray.util.state import list_actors

    replicas = [a.pid for a in list_actors(filters=[("state", "=", "ALIVE")], limit=1000)
                if a.class_name.startswith("ServeReplica:fleet:")]
    ranks = [r.pid for stats in replica_stats(handle, healthy=True).values() for r in stats.ranks]
    return replicas + ranks


BAD_BODIES = [
    b"{not json", b"[]", b'{"prompt": 5}', b'{"prompt": [1, 2], "max_tokens": -1}',
    b'{"prompt": [1, 2], "temperature": "hot"}', b'{"prompt": [1, 2], "top_p": 3}',
    b'{"prompt": [1, 2], "n": 0}', b'{"prompt": [999999999]}', b'{"prompt": [1, 2], "unknown_field": 1}',
    b'{"prompt": "\xff\xfe"}',
]


def test_a_soak_of_500_concurrent_requests_with_disconnects_aborts_and_bad_bodies_leaves_nothing_behind(fleet):
    pids = serving_pids(fleet.handle)
    rss_before = {pid: process_rss_mb(pid) for pid in pids}
    rng = random.Random(5)
    kinds = ["good"] * 350 + ["disconnect"] * 60 + ["abort"] * 40 + ["bad"] * 50
    rng.shuffle(kinds)

    async def good(session, i):
        body = {"prompt": [rng.randrange(1000, 199000) for _ in range(rng.randrange(4, 40))], "max_tokens": 6,
                "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
        async with session.post(f"{fleet.url}/completions", json=body) as response:
            if response.status != 200:  # a clear refusal (429 when queues are full) is allowed, a hang is not
                assert response.status in (429, 503), await response.text()
                return "refused"
            usage, done = None, False
            async for line in response.content:
                if line.startswith(b"data: {"):
                    event = json.loads(line[6:])
                    assert "error" not in event, event
                    usage = event.get("usage") or usage
                done = done or line.startswith(b"data: [DONE]")
            assert done and usage["completion_tokens"] == 6, usage
            return "good"

    async def disconnect(session, i):
        body = {"prompt": [rng.randrange(1000, 199000) for _ in range(30)], "max_tokens": 400, "stream": True}
        async with session.post(f"{fleet.url}/completions", json=body) as response:
            await response.content.readline()
            response.close()  # the client goes away mid-stream
        return "disconnect"

    async def abort(channel, i):
        request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=[rng.randrange(1000, 199000) for _ in range(20)]),
                                     sampling=pb.SamplingParams(max_tokens=400))
        call = pb_grpc.GptossServiceStub(channel).Generate(request, metadata=[("application", APP)])
        async for _ in call:
            call.cancel()  # a cancelled call aborts the request
            break
        return "abort"

    async def bad(session, i):
        async with session.post(f"{fleet.url}/completions", data=BAD_BODIES[i % len(BAD_BODIES)],
                                headers={"Content-Type": "application/json"}) as response:
            assert response.status == 400, await response.text()
            assert (await response.json())["error"]["message"]
        return "bad"

    async def soak():
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=240)) as session, \
                grpc.aio.insecure_channel(fleet.grpc) as channel:
            jobs = {"good": lambda i: good(session, i), "disconnect": lambda i: disconnect(session, i),
                    "abort": lambda i: abort(channel, i), "bad": lambda i: bad(session, i)}
            return await asyncio.wait_for(asyncio.gather(*(jobs[k](i) for i, k in enumerate(kinds))), timeout=280)

    outcomes = Counter(asyncio.run(soak()))
    assert outcomes["good"] + outcomes["refused"] == 350 and outcomes["good"] >= 300, outcomes
    assert outcomes["disconnect"] == 60 and outcomes["abort"] == 40 and outcomes["bad"] == 50

    # Every group's KV pool back to empty (cached blocks stay, evictable) once aborts have landed.
    deadline = time.monotonic() + 60
    while True:
        stats = replica_stats(fleet.handle, healthy=True)
        busy = {rid: (s.num_running, s.num_waiting, s.num_kv_blocks_used, s.num_open_streams)
                for rid, s in stats.items()}
        if all(v == (0, 0, 0, 0) for v in busy.values()):
            break
        assert time.monotonic() < deadline, f"requests left behind: {busy}"
        time.sleep(0.2)
    for s in stats.values():
        assert all(r.engine.num_kv_blocks_free == r.engine.num_kv_blocks for r in s.ranks)
    rss_after = {pid: process_rss_mb(pid) for pid in pids}
    for pid, before in rss_before.items():
        assert rss_after[pid] < 1.3 * before + 150, (pid, before, rss_after[pid])


# --- metrics -----------------------------------------------------------------------------------------


def scrape() -> str:
    """Every node's Prometheus export (Ray's metrics agent), concatenated."""
    texts = []
    for node in ray.nodes():
        if node["Alive"]:
            url = f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
            texts.append(urllib.request.urlopen(url, timeout=10).read().decode())
    return "\n".join(texts)


def samples(text: str, name: str) -> list[tuple[dict, float]]:
    out = []
    for match in re.finditer(rf"^{re.escape(name)}{{(.*?)}} (\S+)$", text, re.M):
        labels = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1)))
        out.append((labels, float(match.group(2))))
    return out


def test_the_metrics_export_shows_requests_latencies_kv_prefix_cache_steps_experts_health_and_errors(fleet):
    live = set(replica_stats(fleet.handle, healthy=True))
    wanted = {
        "ray_gptoss_request_success_total": lambda v: v > 0,
        "ray_gptoss_time_to_first_token_seconds_count": lambda v: v > 0,
        "ray_gptoss_inter_token_latency_seconds_count": lambda v: v > 0,
        "ray_gptoss_e2e_request_latency_seconds_count": lambda v: v > 0,
        "ray_gptoss_prompt_tokens_total": lambda v: v > 0,
        "ray_gptoss_generation_tokens_total": lambda v: v > 0,
        "ray_gptoss_num_requests_running": lambda v: v >= 0,
        "ray_gptoss_num_requests_waiting": lambda v: v >= 0,
        "ray_gptoss_kv_cache_usage_perc": lambda v: 0 <= v <= 1,
        "ray_gptoss_prefix_cache_queries_total": lambda v: v > 0,
        "ray_gptoss_prefix_cache_hits_total": lambda v: v > 0,
        "ray_gptoss_step_time_seconds_count": lambda v: v > 0,
        "ray_gptoss_expert_tokens_total": lambda v: v > 0,
        "ray_gptoss_group_healthy": lambda v: v in (0.0, 1.0),
        "ray_gptoss_group_starts_total": lambda v: v >= 1,
        "ray_gptoss_request_errors_total": lambda v: v > 0,
        "ray_gptoss_gateway_requests_total": lambda v: v > 0,
    }
    deadline = time.monotonic() + 60
    while True:  # the agents export every second; wait for the live replicas' latest figures
        text = scrape()
        found = {name: [(labels, v) for labels, v in samples(text, name)
                        if labels.get("model") == MODEL and labels.get("replica", next(iter(live))) in live]
                 for name in wanted}
        healthy = {labels["replica"] for labels, v in found["ray_gptoss_group_healthy"] if v == 1.0}
        if all(found.values()) and healthy == live:
            break
        assert time.monotonic() < deadline, {name: len(v) for name, v in found.items()} | {"healthy": healthy}
        time.sleep(1.0)
    for name, ok in wanted.items():
        assert all(ok(v) for _, v in found[name]), (name, found[name])
    reasons = {labels["finished_reason"] for labels, _ in found["ray_gptoss_request_success_total"]}
    assert "length" in reasons and "abort" in reasons
    assert {labels["status"] for labels, _ in found["ray_gptoss_request_errors_total"]} >= {"400"}
    # Tokens per expert: every layer routes each token to 4 experts, so the layers' totals agree.
    per_layer = Counter()
    for labels, v in found["ray_gptoss_expert_tokens_total"]:
        per_layer[labels["layer"]] += v
    assert len(set(per_layer.values())) == 1 and len(per_layer) == 2, per_layer  # tiny: 2 layers
    assert {labels["rank"] for labels, _ in found["ray_gptoss_step_time_seconds_count"]} == {"0"}
