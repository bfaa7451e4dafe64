"""Prometheus metrics, through Ray's metrics export (each node's metrics agent, which KubeRay's
Prometheus scrapes). Names follow vLLM's (`vllm:time_to_first_token_seconds` ->
`gptoss_time_to_first_token_seconds`) so existing dashboards map; Ray's exporter adds its `ray_`
namespace on the wire: `ray_gptoss_time_to_first_token_seconds`.

`ModelServerMetrics` is kept by each model server replica (labels `model`, `replica`, and `rank`
where it applies): per-request latencies and tokens as they happen, and the group's engine figures
from a periodic stats poll (gauges set, counters advanced by what changed since the last poll).
`GatewayMetrics` counts the errors the gateway answers, by status.
"""

from __future__ import annotations

import asyncio
import logging
import urllib.request
from collections.abc import Sequence

import ray
from ray.util.metrics import Counter, Gauge, Histogram

from cluster import GroupStats

TTFT_BUCKETS_S = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                  20.0, 40.0, 80.0, 160.0, 640.0]
ITL_BUCKETS_S = [0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
                 7.5, 10.0, 20.0, 40.0]
E2E_BUCKETS_S = [0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0]
STEP_BUCKETS_S = [0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24]

_SERVER = ("model", "replica")
logger = logging.getLogger("ray.serve")


class ModelServerMetrics:
    def __init__(self, model: str, replica: str):
        self.tags = {"model": model, "replica": replica}
        t = self.tags
        self.running = Gauge("gptoss_num_requests_running", "Requests in the group's engines' running batches.",
                             _SERVER).set_default_tags(t)
        self.waiting = Gauge("gptoss_num_requests_waiting", "Requests queued in the group's engines.",
                             _SERVER).set_default_tags(t)
        self.kv_usage = Gauge("gptoss_kv_cache_usage_perc", "Fraction of the group's KV blocks held by requests "
                              "(0-1).", _SERVER).set_default_tags(t)
        self.healthy = Gauge("gptoss_group_healthy", "1 while the replica's EP group is healthy, else 0.",
                             _SERVER).set_default_tags(t)
        self.group_starts = Counter("gptoss_group_starts_total", "EP groups started (a replica replaced after a "
                                    "failure starts a new one).", _SERVER).set_default_tags(t)
        self.group_failures = Counter("gptoss_group_failures_total", "EP groups seen failed (a rank died, a "
                                      "collective timed out, a step stalled).", _SERVER).set_default_tags(t)
        self.ttft = Histogram("gptoss_time_to_first_token_seconds", "From the request's arrival at the model "
                              "server to its first token.", TTFT_BUCKETS_S, _SERVER).set_default_tags(t)
        self.itl = Histogram("gptoss_inter_token_latency_seconds", "Between consecutive output tokens of a "
                             "request (a merged chunk of k tokens counts k gaps of 1/k).", ITL_BUCKETS_S,
                             _SERVER).set_default_tags(t)
        self.e2e = Histogram("gptoss_e2e_request_latency_seconds", "From arrival to the last token.",
                             E2E_BUCKETS_S, _SERVER).set_default_tags(t)
        self.prompt_tokens = Counter("gptoss_prompt_tokens_total", "Prompt tokens of finished requests.",
                                     _SERVER).set_default_tags(t)
        self.generation_tokens = Counter("gptoss_generation_tokens_total", "Generated tokens.",
                                         _SERVER).set_default_tags(t)
        self.finished = Counter("gptoss_request_success_total", "Ended requests by how they ended: stop, "
                                "length, abort (cancelled, or the client went away), error.", (*_SERVER, "finished_reason")).set_default_tags(t)
        self.prefix_queries = Counter("gptoss_prefix_cache_queries_total", "Prompt tokens looked up in the "
                                      "prefix cache.", _SERVER).set_default_tags(t)
        self.prefix_hits = Counter("gptoss_prefix_cache_hits_total", "Of those, tokens found cached.",
                                   _SERVER).set_default_tags(t)
        self.preemptions = Counter("gptoss_num_preemptions_total", "Requests preempted for lack of KV blocks.",
                                   _SERVER).set_default_tags(t)
        self.step_time = Histogram("gptoss_step_time_seconds", "Mean engine step time of a rank over each "
                                   "stats period.", STEP_BUCKETS_S, (*_SERVER, "rank")).set_default_tags(t)
        self.expert_tokens = Counter("gptoss_expert_tokens_total", "Tokens routed to each expert of each layer "
                                     "(the input of expert load balancing; EP groups of G > 1).",
                                     (*_SERVER, "layer", "expert")).set_default_tags(t)
        self.eplb_imbalance = Gauge("gptoss_eplb_imbalance", "Expert load balancing: the busiest rank's expected "
                                    "load over the mean, per layer, on the latest plan's counts, under the "
                                    "placement before it and after it (when).", (*_SERVER, "layer", "when")
                                    ).set_default_tags(t)
        self.eplb_rearrangements = Counter("gptoss_eplb_rearrangements_total", "Expert rearrangements run (also "
                                           "those that moved no layer).", _SERVER).set_default_tags(t)
        self.eplb_pause = Histogram("gptoss_eplb_pause_seconds", "How long a rearrangement paused the group "
                                    "(its slowest rank).", STEP_BUCKETS_S, _SERVER).set_default_tags(t)
        self._last: dict[str, float] = {}  # cumulative figures at the previous poll
        self._last_rank: dict[int, tuple[int, float]] = {}  # rank -> (steps, step time)
        self._last_experts: list[list[int]] = []
        # Generated tokens are counted here and added to the counter per request end and per stats poll:
        # a Ray metric record per chunk was ~4% of the model server's CPU at 128 streams.
        self._unreported_tokens = 0
        self.group_starts.inc()

    # --- per request -------------------------------------------------------------------------------

    def request_finished(self, finish_reason: str, num_prompt_tokens: int, e2e_s: float) -> None:
        self.finished.inc(tags={"finished_reason": finish_reason})
        self.prompt_tokens.inc(num_prompt_tokens)
        self.e2e.observe(e2e_s)
        self._report_tokens()

    def first_tokens(self, count: int, ttft_s: float) -> None:
        """A request's first chunk: `count` tokens, `ttft_s` after its arrival."""
        self.ttft.observe(ttft_s)
        self._unreported_tokens += count

    def more_tokens(self, count: int, gap_s: float) -> None:
        """A later chunk of `count` tokens, `gap_s` after the previous chunk."""
        if count <= 0:
            return
        self._unreported_tokens += count
        for _ in range(count):
            self.itl.observe(gap_s / count)

    # --- per stats poll ----------------------------------------------------------------------------

    def group_state(self, state: str, was_healthy: bool) -> None:
        healthy = state in ("healthy", "draining")
        self.healthy.set(1.0 if healthy else 0.0)
        if was_healthy and state == "failed":
            self.group_failures.inc()

    def _report_tokens(self) -> None:
        if self._unreported_tokens:
            self.generation_tokens.inc(self._unreported_tokens)
            self._unreported_tokens = 0

    def group_stats(self, stats: GroupStats) -> None:
        self._report_tokens()
        self.running.set(stats.num_running)
        self.waiting.set(stats.num_waiting)
        total = stats.num_kv_blocks_used + stats.num_kv_blocks_free
        self.kv_usage.set(stats.num_kv_blocks_used / total if total else 0.0)
        engines = [r.engine for r in stats.ranks]
        self._advance(self.prefix_queries, "prefix_queries", sum(e.prefix_cache_query_tokens for e in engines))
        self._advance(self.prefix_hits, "prefix_hits", sum(e.prefix_cache_hit_tokens for e in engines))
        self._advance(self.preemptions, "preemptions", sum(e.num_preemptions for e in engines))
        for r in stats.ranks:
            steps, step_s = self._last_rank.get(r.rank, (0, 0.0))
            if r.engine.num_steps > steps:
                self.step_time.observe((r.engine.step_time_s - step_s) / (r.engine.num_steps - steps),
                                       tags={"rank": str(r.rank)})
            self._last_rank[r.rank] = (r.engine.num_steps, r.engine.step_time_s)
        self._advance_experts(stats.expert_token_counts)
        if stats.eplb is not None:
            self._eplb(stats.eplb)

    def _eplb(self, eplb) -> None:
        if eplb.last is None or eplb.num_rearrangements <= self._last.get("eplb_rearrangements", 0):
            return  # nothing new since the last poll
        self._advance(self.eplb_rearrangements, "eplb_rearrangements", eplb.num_rearrangements)
        self.eplb_pause.observe(eplb.last.pause_s)  # the latest (one per poll: interval_steps apart)
        for when, values in (("before", eplb.last.imbalance_before), ("after", eplb.last.imbalance_after)):
            for layer, value in enumerate(values):
                self.eplb_imbalance.set(value, tags={"layer": str(layer), "when": when})

    def _advance(self, counter: Counter, name: str, total: float) -> None:
        delta = total - self._last.get(name, 0.0)
        if delta > 0:
            counter.inc(delta)
        self._last[name] = total

    def _advance_experts(self, counts: Sequence[Sequence[int]]) -> None:
        for layer, row in enumerate(counts):
            last = self._last_experts[layer] if layer < len(self._last_experts) else [0] * len(row)
            for expert, (now, before) in enumerate(zip(row, last, strict=True)):
                if now > before:
                    self.expert_tokens.inc(now - before, tags={"layer": str(layer), "expert": str(expert)})
        self._last_experts = [list(row) for row in counts]


MIGRATION_RESUME_BUCKETS_S = [0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 40.0, 80.0]


class GatewayMetrics:
    def __init__(self, model: str):
        self.errors = Counter("gptoss_request_errors_total", "Requests the gateway answered with an error, by "
                              "HTTP status and API.", ("model", "status", "api")).set_default_tags({"model": model})
        self.requests = Counter("gptoss_gateway_requests_total", "Requests the gateway received, by API.",
                                ("model", "api")).set_default_tags({"model": model})
        self.migrations = Counter("gptoss_migrations_total", "Streams moved to another group after tokens were "
                                  "sent, by why: failure (the group failed), drain (its replica was removed).",
                                  ("model", "reason")).set_default_tags({"model": model})
        self.migration_resume = Histogram("gptoss_migration_resume_seconds", "The pause a moved stream's client "
                                          "saw: from the break to the next token.", MIGRATION_RESUME_BUCKETS_S,
                                          ("model",)).set_default_tags({"model": model})
        self.migrated_outcomes = Counter("gptoss_migrated_requests_total", "Choices that moved at least once, by "
                                         "how they ended: finished, error, abort.",
                                         ("model", "outcome")).set_default_tags({"model": model})
        self.received_tokens = Counter("gptoss_gateway_received_tokens_total", "Tokens of finished streams the "
                                       "gateway received from model servers, by how: channel (the token channel, "
                                       "one message per engine step for all streams) or call (in each stream's "
                                       "Serve call).", ("model", "path")).set_default_tags({"model": model})

    def received(self, via_channel: int, in_call: int) -> None:
        if via_channel:
            self.received_tokens.inc(via_channel, tags={"path": "channel"})
        if in_call:
            self.received_tokens.inc(in_call, tags={"path": "call"})

    def request(self, api: str) -> None:
        self.requests.inc(tags={"api": api})

    def error(self, api: str, http_status: int) -> None:
        self.errors.inc(tags={"api": api, "status": str(http_status)})

    def migrated(self, reason: str) -> None:
        self.migrations.inc(tags={"reason": reason})

    def resumed(self, pause_s: float) -> None:
        self.migration_resume.observe(pause_s)

    def migrated_outcome(self, outcome: str) -> None:
        self.migrated_outcomes.inc(tags={"outcome": outcome})


# --- GET /metrics on the API port ----------------------------------------------------------------------

GPTOSS_FAMILY_PREFIX = "ray_gptoss_"  # Ray's exporter adds its namespace to ours


async def scrape_gptoss_metrics(timeout_s: float = 5.0) -> str:
    """The gptoss_* series of every alive node's Ray metrics export, merged into one Prometheus text
    page (one HELP and TYPE per family). A node that does not answer within `timeout_s` is left out."""
    nodes = await asyncio.to_thread(ray.nodes)
    urls = [f"http://{n['NodeManagerAddress']}:{n['MetricsExportPort']}/metrics"
            for n in nodes if n.get("Alive") and n.get("MetricsExportPort")]
    pages = await asyncio.gather(*(asyncio.to_thread(_fetch, url, timeout_s) for url in urls))
    return merge_families([page for page in pages if page], GPTOSS_FAMILY_PREFIX)


def _fetch(url: str, timeout_s: float) -> str:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:  # noqa: S310 - Ray's own exporter
            return response.read().decode("utf-8", errors="replace")
    except OSError as e:
        logger.warning("metrics: %s did not answer (%s)", url, e)
        return ""


def merge_families(pages: list[str], prefix: str) -> str:
    """The families named `prefix`* of several Prometheus text pages, each once (HELP, TYPE, then the
    samples of every page)."""
    headers: dict[str, dict[str, str]] = {}  # family -> {"HELP": line, "TYPE": line}
    samples: dict[str, list[str]] = {}
    current: str | None = None
    for page in pages:
        for line in page.splitlines():
            if line.startswith(("# HELP ", "# TYPE ")):
                kind, name = line.split(" ", 3)[1:3]
                current = name if name.startswith(prefix) else None
                if current is not None:
                    headers.setdefault(current, {}).setdefault(kind, line)
                    samples.setdefault(current, [])
            elif current is not None and line.startswith(current):
                samples[current].append(line)
    return "".join(f"{header.get('HELP', '')}\n{header.get('TYPE', '')}\n" + "".join(f"{s}\n" for s in samples[name])
                   for name, header in headers.items())
