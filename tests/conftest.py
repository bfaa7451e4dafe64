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
