"""Shared test set-up: an isolated environment and the expensive shared objects (checkpoints)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

# Nothing leaks into the home folder, and no test depends on the network or Ray's token auth.
_OWN_TMP = not os.environ.get("GPTOSS_TEST_TMP")
_TMP = Path(os.environ.get("GPTOSS_TEST_TMP") or tempfile.mkdtemp(prefix="gptoss-tests-"))
os.environ.setdefault("GPTOSS_CACHE_DIR", str(_TMP / "cache"))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_TMPDIR", str(_TMP / "ray"))
os.environ.setdefault("CUPY_CACHE_DIR", str(_TMP / "cupy"))
# Simulated Ray clusters, and the gloo groups between their actors, stay on loopback: with this
# set before ray is imported, Ray takes 127.0.0.1 as every node's address.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
# A request whose prompt holds this reserved token makes its engine step raise (tests/test_migration.py):
# no other test sends it.
FAULT_TOKEN = 201_000
os.environ.setdefault("GPTOSS_INJECT_STEP_FAULT_TOKEN", str(FAULT_TOKEN))
# Serve's gRPC proxy refuses messages over the test apps' gateway.max_request_bytes, as `gptoss-serve serve`
# and the deploy manifests set it up.
TEST_MAX_REQUEST_BYTES = 1 << 20
os.environ.setdefault("RAY_SERVE_GRPC_MAX_MESSAGE_SIZE", str(TEST_MAX_REQUEST_BYTES))
# Metrics and autoscaling figures reach their consumers within a second or two instead of ten.
os.environ.setdefault("RAY_metrics_report_interval_ms", "1000")
os.environ.setdefault("RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S", "0.5")
os.environ.setdefault("RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S", "0.5")

import shutil  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

import gptoss  # noqa: E402


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """The `tiny` preset in the HF release layout, seed 0."""
    return gptoss.write_random_checkpoint(tmp_path_factory.mktemp("tiny"), "tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_model(tiny_checkpoint):
    return gptoss.load_model(tiny_checkpoint, dtype=torch.float32)


def pytest_sessionfinish(session, exitstatus):
    if _OWN_TMP:
        shutil.rmtree(_TMP, ignore_errors=True)


@pytest.fixture(scope="session")
def ray_cluster():
    """A simulated two-node Ray cluster on loopback; each node has 4 logical CPUs and 3 fake GPUs (a group of 4 must span both), so
    placement is exercised as on GPU nodes while compute falls back to the CPU."""
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args=dict(num_cpus=4, num_gpus=3))
    cluster.add_node(num_cpus=4, num_gpus=3)
    ray.init(address=cluster.address, log_to_driver=False)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture(scope="session")
def event_loop_thread():
    """One asyncio loop in a background thread for objects that must live on one loop across tests
    (EP groups); `run(coro, timeout_s)` runs a coroutine there and returns its result."""
    import asyncio
    import threading

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    def run(coro, timeout_s: float = 120.0):
        return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout_s)

    yield run
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def serve_instance(ray_cluster):
    """Ray Serve on the simulated cluster, HTTP and gRPC proxies on free loopback ports (head node only:
    the simulated nodes share one address)."""
    from types import SimpleNamespace

    from ray import serve
    from ray.serve.config import HTTPOptions, gRPCOptions

    from serve.app import GRPC_SERVICER_FUNCTIONS

    http_port, grpc_port = free_port(), free_port()
    serve.start(proxy_location="HeadOnly", http_options=HTTPOptions(host="127.0.0.1", port=http_port),
                grpc_options=gRPCOptions(port=grpc_port, grpc_servicer_functions=GRPC_SERVICER_FUNCTIONS))
    yield SimpleNamespace(http=f"http://127.0.0.1:{http_port}", grpc=f"127.0.0.1:{grpc_port}")
    serve.shutdown()


# The app most serving tests share: the tiny model in float32 (exact), one CPU rank, a small KV pool.
SERVE_TEST_CONFIG = {
    "model": {"dtype": "float32", "packed_experts": False},
    "group": {"num_ranks": 1, "device": "cpu", "step_timeout_s": 30},
    "engine": {"max_num_seqs": 16, "max_num_batched_tokens": 256, "kv_cache_gib": 0.02, "max_model_len": 2048},
    "model_server": {"num_cpus": 0.1, "health_check_period_s": 1.0, "graceful_shutdown_timeout_s": 10},
    "gateway": {"num_cpus": 0.1, "max_request_bytes": TEST_MAX_REQUEST_BYTES, "admission_timeout_s": 5},
}


@pytest.fixture(scope="session")
def serve_app(serve_instance, tiny_checkpoint):
    """The shared app, deployed once; `.http`, `.grpc` endpoints, `.config`, `.model_server` (a handle)."""
    from types import SimpleNamespace

    from ray import serve

    from serve.app import MODEL_SERVER_NAME, build_app_from_config
    from serve.config import parse_config

    raw = {**SERVE_TEST_CONFIG, "model": {**SERVE_TEST_CONFIG["model"], "checkpoint": str(tiny_checkpoint),
                                          "name": "tiny-test"}}
    config = parse_config(raw)
    serve.run(build_app_from_config(config), name="main", route_prefix="/")
    yield SimpleNamespace(http=serve_instance.http, grpc=serve_instance.grpc, config=config, name="tiny-test",
                          model_server=serve.get_deployment_handle(MODEL_SERVER_NAME, app_name="main"))
    serve.delete("main")


@pytest.fixture(scope="session")
def scripted_checkpoint(tmp_path_factory) -> Path:
    """The `tiny` layout as a bigram machine whose greedy reply to any rendered prompt is the
    get_weather tool call of tests/scripted_model.py (TOOL_CALL_COMPLETION)."""
    from tests.scripted_model import TOOL_CALL_SCRIPT, write_scripted_checkpoint

    return write_scripted_checkpoint(tmp_path_factory.mktemp("scripted"), TOOL_CALL_SCRIPT)
