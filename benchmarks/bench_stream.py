"""Client-side figures of streamed requests, shared by the serving benchmarks: when each request's
tokens arrived (TTFT, inter-token gaps) and their percentiles."""

from __future__ import annotations

import statistics
import time


class Trace:
    """Arrival times of one request's tokens."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.first: float | None = None
        self.last = self.start
        self.gaps_s: list[float] = []
        self.chunk_gaps_s: list[float] = []  # between a chunk and the previous one, as they came
        self.num_tokens = 0
        self.num_chunks = 0

    def tokens(self, count: int) -> None:
        if count <= 0:
            return
        now = time.perf_counter()
        self.num_chunks += 1
        if self.first is not None:
            self.chunk_gaps_s.append(now - self.last)
        if self.first is None:
            self.first = now
            count -= 1
            self.num_tokens += 1
        if count:
            self.gaps_s += [(now - self.last) / count] * count
            self.num_tokens += count
        self.last = now


def summary(traces: list[Trace], wall_s: float) -> dict:
    def pct(values, q):
        ordered = sorted(values)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000 if ordered else float("nan")

    ttft = [t.first - t.start for t in traces if t.first is not None]
    gaps = [g for t in traces for g in t.gaps_s]
    chunk_gaps = [g for t in traces for g in t.chunk_gaps_s]
    tokens = sum(t.num_tokens for t in traces)
    return {"tokens": tokens, "tokens_per_s": tokens / wall_s, "ttft_p50_ms": pct(ttft, 0.5),
            "ttft_p99_ms": pct(ttft, 0.99), "itl_p50_ms": pct(gaps, 0.5), "itl_p99_ms": pct(gaps, 0.99),
            "chunk_gap_p99_ms": pct(chunk_gaps, 0.99),
            "tokens_per_chunk": tokens / max(1, sum(t.num_chunks for t in traces)),
            "ttft_mean_ms": statistics.fmean(ttft) * 1000 if ttft else float("nan")}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
