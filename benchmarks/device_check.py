"""The prepared GPU check: one script for the day a GPU is lent, and runnable on CPU so that it does not rot.

Four parts, each timed, each failure caught and reported so that one does not hide the others:

1. parity: the model in float32 on --device against the CPU reference on the same checkpoint (the
   `small` preset by default): the logits' largest difference over a prompt, and the engine's greedy
   tokens (4 prompts x 16 tokens) on both.
2. engine: engine tokens/s at 1 / 8 / 32 concurrent prompts in bfloat16 on the real-width shape
   (`gpt-oss-20b-2l`: gpt-oss-20b's widths, hidden 2880, vocabulary 201,088, 32 experts, 2 layers).
3. nccl: the `cupy_nccl` communicator on one GPU (an all_to_all of a rank with itself, and the small
   collectives), and an all_to_all across two GPUs where there are two.
4. serve: `gptoss-serve serve` with `group.device` set to --device, answering a chat over HTTP and over
   gRPC (its own Ray instance, on free loopback ports).

No network and no installs (torch, CuPy and NCCL must already be there). Under 8 minutes on one GPU
with the defaults. The last line is one JSON object: each part's figures or its error.

    python benchmarks/device_check.py                                  # on the GPU
    python benchmarks/device_check.py --device cpu --preset tiny \\
        --engine-preset tiny --max-tokens 8                            # on CPU (CI runs this)
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import gptoss  # noqa: E402
from benchmarks.bench_common import git_revision  # noqa: E402
from engine import Engine, EngineConfig, SamplingParams  # noqa: E402

REAL_WIDTH_PRESET = "gpt-oss-20b-2l"


def checkpoint(preset: str, folder: Path) -> Path:
    """A random checkpoint of the preset in the released layout, written once into `folder`."""
    path = folder / f"{preset}-seed0"
    if not (path / "config.json").exists():
        gptoss.write_random_checkpoint(path, preset, seed=0)
    return path


def prompts(n: int, length: int = 24) -> list[list[int]]:
    return [[(97 * i + 31 * j) % 50_000 + 200 for j in range(length)] for i in range(n)]


def greedy_tokens(model, n: int, max_tokens: int) -> list[list[int]]:
    engine = Engine(model, EngineConfig(max_num_seqs=32, kv_cache_bytes=256 << 20))
    params = SamplingParams.greedy(max_tokens=max_tokens, stop_token_ids=())
    return [c.token_ids for c in engine.generate(prompts(n), params)]


def check_parity(args, folder: Path) -> dict:
    path = checkpoint(args.preset, folder)
    reference = gptoss.load_model(path, dtype=torch.float32, device="cpu")
    model = gptoss.load_model(path, dtype=torch.float32, device=args.device)
    ids = torch.tensor(prompts(1, 64)[0])
    want = reference(ids)
    got = model(ids).cpu()
    scale = float(want.abs().max())
    expected, actual = greedy_tokens(reference, 4, 16), greedy_tokens(model, 4, 16)
    return {"preset": args.preset, "max_abs_logit_diff": float((got - want).abs().max()),
            "max_abs_logit": scale, "argmax_agree": float((got.argmax(-1) == want.argmax(-1)).float().mean()),
            "identical_greedy_tokens": expected == actual,
            "greedy_tokens_equal": sum(a == b for e, g in zip(expected, actual, strict=True)
                                       for a, b in zip(e, g, strict=True)),
            "greedy_tokens_total": sum(len(e) for e in expected)}


def check_engine(args, folder: Path) -> dict:
    path = checkpoint(args.engine_preset, folder)
    started = time.perf_counter()
    model = gptoss.load_model(path, dtype=torch.bfloat16, device=args.device)
    load_s = time.perf_counter() - started
    engine = Engine(model, EngineConfig(max_num_seqs=32, max_num_batched_tokens=2048, kv_cache_bytes=1 << 30,
                                        enable_prefix_caching=False))
    params = SamplingParams.greedy(max_tokens=args.max_tokens, stop_token_ids=())
    engine.generate(prompts(2), params)  # warm-up: kernels, allocator
    rates = {}
    for n in (1, 8, 32):
        synchronize(args.device)
        started = time.perf_counter()
        done = engine.generate(prompts(n), params)
        synchronize(args.device)
        elapsed = time.perf_counter() - started
        rates[f"tokens_per_s_at_{n}"] = round(sum(len(c.token_ids) for c in done) / elapsed, 1)
    config = model.config
    return {"preset": args.engine_preset, "dtype": "bfloat16", "hidden": config.hidden_size,
            "vocab": config.vocab_size, "layers": config.num_hidden_layers, "experts": config.num_local_experts,
            "max_tokens": args.max_tokens, "load_s": round(load_s, 1)} | rates


def synchronize(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def check_nccl(args, folder: Path) -> dict:
    if torch.device(args.device).type != "cuda" or not torch.cuda.is_available():
        return {"skipped": "no CUDA device: NCCL needs one"}
    from parallel import CommunicatorSpec, create_communicator
    from parallel.cupy_nccl import make_nccl_unique_id

    spec = CommunicatorSpec("cupy_nccl", 1, timeout_s=60.0, nccl_unique_id=make_nccl_unique_id())
    comm = create_communicator(spec, 0, "cuda:0")
    try:
        rows = torch.randn(1000, 2880, device="cuda:0", dtype=torch.bfloat16)
        started = time.perf_counter()
        received = comm.all_to_all(rows, [1000], [1000])
        torch.cuda.synchronize()
        one_gpu_s = time.perf_counter() - started
        out = {"one_gpu_all_to_all_equal": bool(torch.equal(received, rows)),
               "one_gpu_all_to_all_ms": round(one_gpu_s * 1000, 2),
               "one_gpu_all_reduce": comm.all_reduce_ints([3, 4]) == [3, 4]}
    finally:
        comm.close()
    if torch.cuda.device_count() < 2:
        return out | {"two_gpus": "skipped: one CUDA device"}
    return out | {"two_gpus_all_to_all_equal": two_gpu_all_to_all()}


def two_gpu_all_to_all() -> bool:
    """Ranks 0 and 1 on cuda:0 and cuda:1 (a process each) swap halves; each checks what it got."""
    from parallel.cupy_nccl import make_nccl_unique_id

    unique_id = make_nccl_unique_id().hex()
    code = ("import sys, torch; from parallel import CommunicatorSpec, create_communicator\n"
            "rank, uid = int(sys.argv[1]), bytes.fromhex(sys.argv[2])\n"
            "comm = create_communicator(CommunicatorSpec('cupy_nccl', 2, timeout_s=60.0, nccl_unique_id=uid), rank, "
            "f'cuda:{rank}')\n"
            "rows = torch.full((8, 64), float(rank), device=f'cuda:{rank}')\n"
            "got = comm.all_to_all(rows, [4, 4], [4, 4]); torch.cuda.synchronize()\n"
            "ok = bool((got[:4] == 0).all() and (got[4:] == 1).all()); comm.close(); sys.exit(0 if ok else 3)\n")
    root = Path(__file__).resolve().parents[1]
    procs = [subprocess.Popen([sys.executable, "-c", code, str(r), unique_id], cwd=root) for r in (0, 1)]
    return all(p.wait(timeout=120) == 0 for p in procs)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_serve(args, folder: Path) -> dict:
    import grpc
    import requests

    from serve.proto.gptoss.v1 import gptoss_pb2 as pb
    from serve.proto.gptoss.v1 import gptoss_pb2_grpc as pb_grpc

    path = checkpoint(args.preset, folder)
    config = folder / "serve.yaml"
    config.write_text(f"model:\n  checkpoint: {path}\n  name: device-check\n"
                      f"group:\n  num_ranks: 1\n  device: {args.device}\n"
                      f"engine:\n  max_num_seqs: 16\n  kv_cache_gib: 0.25\n")
    failed_starts: list[str] = []
    while True:
        started = time.perf_counter()
        process, http_port, grpc_port = start_server(config)
        try:
            failure = wait_until_up(process, f"http://127.0.0.1:{http_port}", args.serve_timeout_s)
        except BaseException:
            stop_server(process)
            raise
        if failure is None:
            break
        stop_server(process)
        failed_starts.append(failure)
        if len(failed_starts) == 2:
            raise RuntimeError(" / then: ".join(failed_starts))
        # Once seen in a full test run (not reproduced): the server exited while starting. Tried once more
        # on fresh ports, and the failure is kept in the figures.
        print(f"# serve: {failure}; starting once more", file=sys.stderr)
    base = f"http://127.0.0.1:{http_port}"
    try:
        up_s = time.perf_counter() - started
        started = time.perf_counter()
        reply = requests.post(f"{base}/v1/chat/completions", timeout=120, json={
            "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 16, "temperature": 0})
        reply.raise_for_status()
        http_s = time.perf_counter() - started
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            request = pb.GenerateRequest(chat=pb.Chat(messages=[pb.ChatMessage(role="user", content="Hello")]),
                                         sampling=pb.SamplingParams(max_tokens=16, temperature=0))
            started = time.perf_counter()
            stub = pb_grpc.GptossServiceStub(channel)
            messages = list(stub.Generate(request, timeout=120))
            grpc_s = time.perf_counter() - started
            info = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=30)
        return {"device": args.device, "up_s": round(up_s, 1),
                "http_chat_tokens": reply.json()["usage"]["completion_tokens"], "http_chat_s": round(http_s, 3),
                "grpc_chat_tokens": messages[-1].usage.completion_tokens, "grpc_chat_s": round(grpc_s, 3),
                "served_device": info.device, "served_dtype": info.dtype} | (
                    {"failed_starts": failed_starts} if failed_starts else {})
    finally:
        stop_server(process)


def start_server(config: Path) -> tuple[subprocess.Popen, int, int]:
    """`gptoss-serve serve` on `config` in its own process group, on two free ports."""
    http_port, grpc_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    process = subprocess.Popen([sys.executable, "-m", "serve.cli", "serve", str(config), "--host", "127.0.0.1",
                                "--http-port", str(http_port), "--grpc-port", str(grpc_port)],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True, cwd=Path(__file__).resolve().parents[1])
    return process, http_port, grpc_port


def wait_until_up(process: subprocess.Popen, base: str, timeout_s: float) -> str | None:
    """None once the server answers /v1/models; if it exits first, what it said last (its error first)."""
    import requests

    deadline = time.monotonic() + timeout_s
    while True:
        if process.poll() is not None:
            lines = process.stdout.read().strip().splitlines()
            return (f"gptoss-serve serve exited with {process.returncode}: {lines[-1] if lines else ''} "
                    f"(its output's end: {' | '.join(lines[-25:])[-1500:]})")
        try:
            if requests.get(f"{base}/v1/models", timeout=10).status_code == 200:
                return None
        except requests.RequestException:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"the server did not answer /v1/models within {timeout_s} s")
        time.sleep(1)


def stop_server(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGINT)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


PARTS: dict[str, Callable[[argparse.Namespace, Path], dict]] = {
    "parity": check_parity, "engine": check_engine, "nccl": check_nccl, "serve": check_serve}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:1, or cpu")
    parser.add_argument("--preset", default="small", help="parity and serve: the checkpoint's preset")
    parser.add_argument("--engine-preset", default=REAL_WIDTH_PRESET, help="engine speed: the checkpoint's preset")
    parser.add_argument("--max-tokens", type=int, default=64, help="engine speed: tokens per prompt")
    parser.add_argument("--parts", nargs="+", default=list(PARTS), choices=list(PARTS))
    parser.add_argument("--folder", help="where the random checkpoints are written (default: a temporary folder)")
    parser.add_argument("--serve-timeout-s", type=float, default=240.0)
    args = parser.parse_args()

    folder = Path(args.folder) if args.folder else Path(tempfile.mkdtemp(prefix="device-check-"))
    folder.mkdir(parents=True, exist_ok=True)
    name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    print(f"# device_check @ {git_revision()}: --device {args.device}, GPU: {name}, torch {torch.__version__}, "
          f"checkpoints in {folder}", flush=True)
    result: dict = {"benchmark": "device_check", "git": git_revision(), "device": args.device, "gpu": name}
    for part in args.parts:
        started = time.perf_counter()
        try:
            figures = PARTS[part](args, folder)
        except Exception as e:  # noqa: BLE001 - reported, and the other parts still run
            traceback.print_exc()
            figures = {"error": f"{type(e).__name__}: {str(e)[:4000]}"}
        figures["seconds"] = round(time.perf_counter() - started, 1)
        result[part] = figures
        print(f"# {part}: {json.dumps(figures)}", flush=True)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
