"""The token dispatcher against the bare exchange of its bytes, per MoE layer.

For each world size G, dtype and tokens per rank, G processes run the dispatcher (dispatch + combine, with
identity experts so only the movement is timed) and, in the same loop, the bare `all_to_all` of the same
rows with the same split sizes (the dispatch and combine exchanges alone). Figures:
- time per layer (p50 / p90 over iterations of the slowest rank; warm-up excluded), of which the time
  inside the dispatcher's three exchanges (counts, dispatch, combine; CPU only: on GPU they return at
  once) and inside the counts exchange alone, and the cost ratio dispatcher / bare exchange (target <= 1.5
  from 64 tokens per rank up; below that the extra exchange of counts dominates);
- bytes each rank sends to other ranks next to the minimum: one activation row per token per destination
  rank, each way. "act" counts the activation rows, "wire" adds the routing metadata carried in each row
  (k local ids + k weights) and the counts exchange.

Shapes: gpt-oss-120b's MoE (hidden 2880, 128 experts, top-4), uniform random routing, contiguous placement.

    .venv/bin/python benchmarks/bench_dispatch.py            # gloo, G = 2 and 4 (~2 min on 2 cores)
    .venv/bin/python benchmarks/bench_dispatch.py --quick --json
    .venv/bin/python benchmarks/bench_dispatch.py --backend cupy_nccl --world-sizes 1 2   # GPUs
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import queue
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gptoss import get_preset  # noqa: E402
from gptoss.load import TORCH_DTYPES as DTYPES  # noqa: E402
from parallel import (  # noqa: E402
    CupyNcclCommunicator,
    ExpertPlacement,
    TokenDispatcher,
    TorchDistCommunicator,
    make_nccl_unique_id,
)

CONFIG = get_preset("gpt-oss-120b")
HIDDEN, NUM_EXPERTS, TOP_K = CONFIG.hidden_size, CONFIG.num_local_experts, CONFIG.num_experts_per_tok

COST_RATIO_MIN_TOKENS = 64
# glibc's defaults return every freed multi-MB tensor to the OS and page-fault it back in on the next
# allocation: on CPU that costs more than the dispatcher's arithmetic (3 ms vs 0.4 ms per layer at 64
# tokens here). Rank processes keep freed memory instead, for the dispatcher and the bare exchange alike.
CPU_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(4 << 30)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backend", choices=["torch_dist", "cupy_nccl"], default="torch_dist",
                        help="torch_dist = gloo on CPU; cupy_nccl = NCCL through CuPy, one GPU per rank")
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 64, 256, 512], help="tokens per rank")
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--quick", action="store_true", help="tokens 1, 64, 512 and 10 iterations")
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON object, last")
    parser.add_argument("--default-malloc", action="store_true",
                        help=f"run the rank processes without {' '.join(f'{k}={v}' for k, v in CPU_MALLOC_ENV.items())}")
    args = parser.parse_args()
    if args.quick:
        args.tokens, args.warmup, args.iters = [1, 64, 512], 3, 10
    for g in args.world_sizes:
        if NUM_EXPERTS % g:
            parser.error(f"--world-sizes: {g} does not divide the {NUM_EXPERTS} experts")
        if args.backend == "cupy_nccl" and g > torch.cuda.device_count():
            parser.error(f"--world-sizes: {g} ranks need {g} GPUs, found {torch.cuda.device_count()}")

    if not args.default_malloc:
        os.environ.update(CPU_MALLOC_ENV)  # inherited by the rank processes spawned below
    print_header(args)
    rows = []
    for g in args.world_sizes:
        rows += run_group(args, g)
    print_table(rows)
    summary = summarize(rows)
    print(f"\ncost ratio (dispatcher / bare exchange of its bytes), >= {COST_RATIO_MIN_TOKENS} tokens/rank: "
          f"max {summary['cost_ratio_max']:.2f} (target <= 1.5); below: max {summary['cost_ratio_max_small']:.2f}")
    print(f"bytes sent / minimum: activations max {summary['bytes_ratio_max']:.4f} (target <= 1.0); "
          f"with routing metadata and counts max {summary['wire_bytes_ratio_max']:.4f}")
    print(f"peak RSS per rank: {summary['peak_rss_mib']:.0f} MiB")
    if args.json:
        print(json.dumps({**summary, "backend": args.backend, "git": git_revision(), "results": rows}))


def print_header(args) -> None:
    if args.backend == "cupy_nccl":
        machine = f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    else:
        machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
    print("bench_dispatch: dispatcher (dispatch + combine) vs the bare all-to-all of the same bytes, per layer")
    print(f"git {git_revision()} | {platform.node()} | {machine} | torch {torch.__version__} | "
          f"backend {args.backend}{' (gloo)' if args.backend == 'torch_dist' else ''}")
    print(f"shapes: hidden {HIDDEN}, {NUM_EXPERTS} experts, top-{TOP_K}, uniform random routing, contiguous "
          f"placement | tokens/rank {args.tokens} | {args.dtypes} | warm-up {args.warmup}, timed {args.iters}")
    malloc = "glibc defaults" if args.default_malloc else " ".join(f"{k}={v}" for k, v in CPU_MALLOC_ENV.items())
    print(f"rank processes: 1 torch thread each, malloc: {malloc}")


def git_revision() -> str:
    root = Path(__file__).resolve().parents[1]
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True).stdout
        return rev + ("+dirty" if dirty.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


# --- the group of rank processes ---------------------------------------------------------------


def run_group(args, world_size: int) -> list[dict]:
    """Spawns the ranks, collects each rank's timings, merges them (per iteration, the slowest rank)."""
    ctx = mp.get_context("spawn")
    store = dist.TCPStore("127.0.0.1", 0, world_size, is_master=True, wait_for_workers=False)
    unique_id = make_nccl_unique_id() if args.backend == "cupy_nccl" else b""
    results = ctx.Queue()
    procs = [ctx.Process(target=rank_main, args=(rank, world_size, store.port, unique_id, args, results), daemon=True)
             for rank in range(world_size)]
    for p in procs:
        p.start()
    reports: dict[int, list[dict]] = {}
    deadline = time.monotonic() + 1800
    try:
        while len(reports) < world_size:
            try:
                rank, ok, value = results.get(timeout=1.0)
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if p.exitcode is not None and r not in reports]
                if dead or time.monotonic() > deadline:
                    raise SystemExit(f"ranks {dead or 'some'} of G={world_size} failed without reporting") from None
                continue
            if not ok:
                raise SystemExit(f"rank {rank} of G={world_size} failed:\n{value}")
            reports[rank] = value
    finally:
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
                p.join(5)
    merged = []
    for per_rank in zip(*(reports[r] for r in range(world_size)), strict=True):
        first = per_rank[0]
        disp = [max(ts) for ts in zip(*(r["dispatch_s"] for r in per_rank), strict=True)]
        bare = [max(ts) for ts in zip(*(r["bare_s"] for r in per_rank), strict=True)]
        exchange = [max(ts) for ts in zip(*(r["exchange_s"] for r in per_rank), strict=True)]
        counts = [max(ts) for ts in zip(*(r["counts_s"] for r in per_rank), strict=True)]
        act = sum(r["act_bytes"] for r in per_rank)
        wire = sum(r["wire_bytes"] for r in per_rank)
        minimum = sum(r["min_bytes"] for r in per_rank)
        p50 = statistics.median(disp)
        merged.append(dict(
            world_size=world_size, dtype=first["dtype"], tokens_per_rank=first["tokens_per_rank"],
            dispatch_p50_ms=1e3 * p50, dispatch_p90_ms=1e3 * percentile(disp, 0.9),
            in_exchange_p50_ms=1e3 * statistics.median(exchange), in_counts_p50_ms=1e3 * statistics.median(counts),
            bare_p50_ms=1e3 * statistics.median(bare), bare_p90_ms=1e3 * percentile(bare, 0.9),
            cost_ratio=p50 / statistics.median(bare),
            tokens_per_s=world_size * first["tokens_per_rank"] / p50,
            sent_mib_per_rank=wire / world_size / 2**20,
            bytes_ratio=act / minimum if minimum else 1.0, wire_bytes_ratio=wire / minimum if minimum else 1.0,
            peak_rss_mib=max(r["peak_rss_mib"] for r in per_rank)))
    return merged


def rank_main(rank, world_size, port, unique_id, args, results) -> None:
    torch.set_num_threads(1)
    try:
        results.put((rank, True, rank_benchmark(rank, world_size, port, unique_id, args)))
    except BaseException:  # noqa: B036 - reported to the parent
        import traceback

        results.put((rank, False, traceback.format_exc()))


def rank_benchmark(rank: int, world_size: int, port: int, unique_id: bytes, args) -> list[dict]:
    if args.backend == "cupy_nccl":
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
        comm = CupyNcclCommunicator(rank, world_size, unique_id, timeout_s=300, device=device)
    else:
        device = torch.device("cpu")
        comm = TorchDistCommunicator(rank, world_size, "127.0.0.1", port, timeout_s=300, host_store=False)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    placement = ExpertPlacement.contiguous(NUM_EXPERTS, world_size)
    dispatcher = TokenDispatcher(comm, placement)
    out = [measure(comm, dispatcher, DTYPES[dtype_name], tokens, args, sync)
           for dtype_name in args.dtypes for tokens in args.tokens]
    comm.close()
    return out


def measure(comm, dispatcher: TokenDispatcher, dtype: torch.dtype, tokens: int, args, sync) -> dict:
    """One configuration on one rank: per-iteration times of the dispatcher and of the bare exchange."""
    rank, device = comm.rank, comm.device
    gen = torch.Generator().manual_seed(1000 * rank + tokens)
    hidden = torch.randn(tokens, HIDDEN, generator=gen).to(dtype).to(device)
    topk_ids = torch.rand(tokens, NUM_EXPERTS, generator=gen).topk(TOP_K).indices.to(device)
    topk_weights = torch.softmax(torch.randn(tokens, TOP_K, generator=gen), -1).to(device)

    # Time spent inside the communicator during the dispatcher's runs (its 3 exchanges: counts, dispatch,
    # combine); the rest is local work. Only meaningful where exchanges block the host (CPU).
    bare_all_to_all, in_exchange_s, in_counts_s = comm.all_to_all, [0.0], [0.0]

    def timed_all_to_all(*args, **kwargs):
        start = time.perf_counter()
        try:
            return bare_all_to_all(*args, **kwargs)
        finally:
            elapsed = time.perf_counter() - start
            in_exchange_s[0] += elapsed
            if kwargs.get("label", "").endswith("counts"):
                in_counts_s[0] += elapsed

    def run_dispatcher():
        comm.all_to_all = timed_all_to_all
        try:
            expert_in, _, handle = dispatcher.dispatch(hidden, topk_ids, topk_weights)
            return dispatcher.combine(expert_in, handle), handle  # identity experts
        finally:
            del comm.all_to_all

    _, handle = run_dispatcher()
    # The bare exchange: the same rows (the dispatch rows carry the routing metadata) and the same splits.
    meta_cols = 2 * TOP_K * 4 // hidden.element_size()
    dispatch_rows = torch.zeros(sum(handle.send_counts), HIDDEN + meta_cols, dtype=dtype, device=device)
    combine_rows = torch.zeros(sum(handle.recv_counts), HIDDEN, dtype=dtype, device=device)

    def run_bare():
        bare_all_to_all(dispatch_rows, handle.send_counts, handle.recv_counts)
        bare_all_to_all(combine_rows, handle.recv_counts, handle.send_counts)

    dispatch_s, bare_s, exchange_s, counts_s = [], [], [], []
    for i in range(args.warmup + args.iters):
        # Alternate which goes first, so neither always follows the other's tail.
        for fn, times in [(run_dispatcher, dispatch_s), (run_bare, bare_s)][:: 1 if i % 2 else -1]:
            comm.barrier()
            sync()
            in_exchange_s[0] = in_counts_s[0] = 0.0
            start = time.perf_counter()
            fn()
            sync()
            if i >= args.warmup:
                times.append(time.perf_counter() - start)
                if fn is run_dispatcher:
                    exchange_s.append(in_exchange_s[0])
                    counts_s.append(in_counts_s[0])
    return dict(dtype=str(dtype).removeprefix("torch."), tokens_per_rank=tokens, dispatch_s=dispatch_s,
                bare_s=bare_s, exchange_s=exchange_s, counts_s=counts_s,
                peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                **bytes_sent(rank, handle, topk_ids, dispatcher.placement, hidden.element_size(), comm.world_size))


def bytes_sent(rank: int, handle, topk_ids: torch.Tensor, placement: ExpertPlacement, elem_bytes: int,
               world_size: int) -> dict:
    """Bytes this rank sends to other ranks in one layer, and the minimum (one activation row per token per
    destination rank other than itself, each way)."""
    row = HIDDEN * elem_bytes
    meta = 2 * TOP_K * 4
    remote_out = sum(n for r, n in enumerate(handle.send_counts) if r != rank)  # dispatch rows sent
    remote_back = sum(n for r, n in enumerate(handle.recv_counts) if r != rank)  # combine rows sent back
    expert_to_rank = torch.tensor([copies[0][0] for copies in placement.routing_table(rank)])  # one copy each here
    dest_ranks = [set(expert_to_rank[row_ids].tolist()) - {rank} for row_ids in topk_ids.cpu()]
    minimum_out = sum(len(d) for d in dest_ranks)
    counts_bytes = (world_size - 1) * (1 + placement.max_experts_per_rank) * 8
    return dict(act_bytes=(remote_out + remote_back) * row,
                wire_bytes=remote_out * (row + meta) + remote_back * row + counts_bytes,
                # The rows this rank sends back are the minimum of its peers' tokens; sum over ranks
                # makes both directions' minimum: 2 x sum of distinct remote destinations.
                min_bytes=2 * minimum_out * row)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def print_table(rows: list[dict]) -> None:
    print()
    print(f"{'G':>2} {'dtype':>8} {'tok/rank':>8} | {'disp+comb ms':>12} {'p90':>7} {'in a2a':>7} {'counts':>7} | "
          f"{'bare a2a ms':>11} {'p90':>7} | {'cost':>5} | {'tokens/s':>9} | {'MiB sent/rank':>13} | "
          f"{'act/min':>7} {'wire/min':>8}")
    for r in rows:
        print(f"{r['world_size']:>2} {r['dtype']:>8} {r['tokens_per_rank']:>8} | {r['dispatch_p50_ms']:>12.3f} "
              f"{r['dispatch_p90_ms']:>7.3f} {r['in_exchange_p50_ms']:>7.3f} {r['in_counts_p50_ms']:>7.3f} | "
              f"{r['bare_p50_ms']:>11.3f} {r['bare_p90_ms']:>7.3f} | "
              f"{r['cost_ratio']:>5.2f} | {r['tokens_per_s']:>9.0f} | {r['sent_mib_per_rank']:>13.3f} | "
              f"{r['bytes_ratio']:>7.4f} {r['wire_bytes_ratio']:>8.4f}")


def summarize(rows: list[dict]) -> dict:
    large = [r["cost_ratio"] for r in rows if r["tokens_per_rank"] >= COST_RATIO_MIN_TOKENS]
    small = [r["cost_ratio"] for r in rows if r["tokens_per_rank"] < COST_RATIO_MIN_TOKENS]
    return dict(cost_ratio_max=max(large, default=float("nan")), cost_ratio_max_small=max(small, default=float("nan")),
                bytes_ratio_max=max(r["bytes_ratio"] for r in rows),
                wire_bytes_ratio_max=max(r["wire_bytes_ratio"] for r in rows),
                peak_rss_mib=max(r["peak_rss_mib"] for r in rows))


if __name__ == "__main__":
    main()
