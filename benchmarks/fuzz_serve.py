"""The long fuzz run (not a test): thousands of random malformed requests on both APIs (tests/fuzz_requests.py)
against `gptoss-serve`'s app on the embedded tiny model, with good streams running the whole time.

    .venv/bin/python benchmarks/fuzz_serve.py [--requests 10000] [--concurrency 16] [--json]

Reports the statuses seen, the crashes (5xx; gRPC INTERNAL/UNKNOWN/UNAVAILABLE; connection failures),
the good streams that finished or failed, whether a replica was replaced, and the peak memory (VmHWM) of
the gateway replica, its admission worker and the model server's rank: before the serving-edge work a
run of malformed requests drove the gateway to 19 GB and took the node down.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench_common import local_ray_env  # noqa: E402

local_ray_env()

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402
import ray  # noqa: E402
import requests  # noqa: E402
from bench_common import git_revision  # noqa: E402
from bench_stream import free_port  # noqa: E402

from serve.config import parse_config  # noqa: E402
from tests.fuzz_requests import MODEL, grpc_case, grpc_verdict, http_case, http_verdict  # noqa: E402

MAX_REQUEST_BYTES = 1 << 20


def peak_rss_mib(pid: int) -> float:
    """VmHWM of a process (its peak resident memory), MiB; 0 when it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def children_of(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                continue
    return found


def serve_pids() -> dict[str, int]:
    """pid of the gateway replica, its admission worker and the rank actor, found by Ray's process titles."""
    pids = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            title = (entry / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
        except OSError:
            continue
        if title.startswith("ray::ServeReplica:fuzz:Gateway"):
            pids["gateway"] = int(entry.name)
        elif title.startswith("ray::RankActor"):
            pids["rank"] = int(entry.name)
    if "gateway" in pids:
        workers = children_of(pids["gateway"])
        if workers:
            pids["admission worker"] = workers[0]
    return pids


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--good-streams", type=int, default=8, help="streams running beside the fuzz throughout")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    os.environ["RAY_SERVE_GRPC_MAX_MESSAGE_SIZE"] = str(MAX_REQUEST_BYTES)  # as `gptoss-serve serve` sets it
    ray.init(num_cpus=max(4, os.cpu_count() or 2), include_dashboard=False, log_to_driver=False)
    from ray import serve
    from ray.serve.config import HTTPOptions, gRPCOptions

    from gptoss.writer import cached_random_checkpoint
    from serve.app import GRPC_SERVICER_FUNCTIONS, build_app_from_config

    http_port, grpc_port = free_port(), free_port()
    serve.start(http_options=HTTPOptions(host="127.0.0.1", port=http_port),
                grpc_options=gRPCOptions(port=grpc_port, grpc_servicer_functions=GRPC_SERVICER_FUNCTIONS))
    config = parse_config({
        "model": {"checkpoint": str(cached_random_checkpoint("tiny", seed=0)), "name": MODEL, "dtype": "float32"},
        "group": {"num_ranks": 1, "device": "cpu"},
        "engine": {"max_num_seqs": 32, "kv_cache_gib": 0.05, "max_model_len": 2048},
        "gateway": {"max_request_bytes": MAX_REQUEST_BYTES, "admission_timeout_s": 5}})
    serve.run(build_app_from_config(config), name="fuzz", route_prefix="/")
    http, grpc_address = f"http://127.0.0.1:{http_port}", f"127.0.0.1:{grpc_port}"
    try:
        results = run(http, grpc_address, args)
    finally:
        serve.shutdown()
        ray.shutdown()
    return report(results, args)


def run(http: str, grpc_address: str, args) -> dict:
    rng = random.Random(args.seed)
    num_grpc = args.requests // 3
    cases = [("http", http_case(rng)) for _ in range(args.requests - num_grpc)] + \
            [("grpc", grpc_case(rng)) for _ in range(num_grpc)]
    rng.shuffle(cases)
    statuses: Counter = Counter()
    crashes: list[str] = []
    good = Counter()
    stop = threading.Event()
    pids_before = serve_pids()
    channel = grpc.insecure_channel(grpc_address)
    generate = channel.unary_stream("/gptoss.v1.GptossService/Generate", request_serializer=lambda b: b,
                                    response_deserializer=lambda b: b)

    def good_streams(i: int) -> None:
        while not stop.is_set():
            body = {"model": MODEL, "prompt": [40 + i, 41, 42], "max_tokens": 200, "temperature": 0, "stream": True}
            finish = None
            try:
                with requests.post(f"{http}/v1/completions", json=body, stream=True, timeout=300) as response:
                    for line in response.iter_lines():
                        if line.startswith(b"data: {") and b'"error"' not in line:
                            finish = json.loads(line[6:])["choices"][0]["finish_reason"] or finish
            except requests.RequestException:
                pass
            good["finished" if finish == "length" else "failed"] += 1

    def send(item) -> None:
        api, case = item
        try:
            if api == "http":
                response = requests.post(f"{http}/v1/{case.path}", data=case.body, timeout=120,
                                         headers={"Content-Type": "application/json"})
                statuses[f"HTTP {response.status_code}"] += 1
                verdict = http_verdict(response.status_code, response.content)
            else:
                try:
                    list(generate(case.body, timeout=120))
                    code, details = "OK", ""
                except grpc.RpcError as e:
                    code, details = e.code().name, e.details() or ""
                statuses[f"gRPC {code}"] += 1
                verdict = grpc_verdict(code, details)
        except Exception as e:  # noqa: BLE001 - a connection that failed is a crash to report
            statuses[f"{api} connection error"] += 1
            verdict = f"{type(e).__name__}: {e}"
        if verdict:
            crashes.append(f"{api} ({case.what}): {verdict}")

    streams = [threading.Thread(target=good_streams, args=(i,)) for i in range(args.good_streams)]
    for thread in streams:
        thread.start()
    start = time.monotonic()
    with ThreadPoolExecutor(args.concurrency) as pool:
        for done, _ in enumerate(pool.map(send, cases), 1):
            if done % 1000 == 0:
                print(f"{done}/{len(cases)} requests, {len(crashes)} crashes, {time.monotonic() - start:.0f} s",
                      file=sys.stderr, flush=True)
    elapsed = time.monotonic() - start
    stop.set()
    for thread in streams:
        thread.join(300)
    channel.close()
    pids_after = serve_pids()
    healthy = requests.get(f"{http}/health", timeout=30).status_code == 200
    return {"requests": len(cases), "elapsed_s": elapsed, "statuses": dict(sorted(statuses.items())),
            "crashes": crashes, "good": dict(good), "healthy_after": healthy,
            "replaced": sorted(k for k in pids_before if pids_after.get(k) != pids_before[k]),
            "peak_rss_mib": {k: round(peak_rss_mib(pid), 1) for k, pid in pids_after.items()}}


def report(results: dict, args) -> int:
    print(f"fuzz_serve @ {git_revision()}: {results['requests']} malformed requests (2/3 HTTP, 1/3 gRPC), "
          f"{args.concurrency} at once, {args.good_streams} good streams beside them, "
          f"{results['elapsed_s']:.0f} s ({results['requests'] / results['elapsed_s']:.0f} requests/s)")
    for status, count in results["statuses"].items():
        print(f"  {status:>28}: {count}")
    print(f"crashes: {len(results['crashes'])}")
    for crash in results["crashes"][:20]:
        print(f"  {crash}")
    print(f"good streams: {results['good']}; healthy after: {results['healthy_after']}; "
          f"processes replaced: {results['replaced'] or 'none'}")
    print("peak RSS (VmHWM): " + ", ".join(f"{k} {v:.0f} MiB" for k, v in results["peak_rss_mib"].items()))
    if args.json:
        print(json.dumps({"requests": results["requests"], "statuses": results["statuses"],
                          "crashes": len(results["crashes"]), "good_streams": results["good"],
                          "healthy_after": results["healthy_after"], "replaced": results["replaced"],
                          "peak_rss_mib": results["peak_rss_mib"], "revision": git_revision()}))
    return 0 if not results["crashes"] and results["healthy_after"] else 1


if __name__ == "__main__":
    sys.exit(main())
