"""deploy/grafana/gptoss-serve.json reads only metrics the code exports, with labels they carry."""

from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def exported_metrics() -> dict[str, set[str]]:
    """Prometheus name (with Ray's `ray_` namespace and the histogram series) -> its label names, read
    from serve/metrics.py's metric definitions."""
    source = (ROOT / "serve" / "metrics.py").read_text()
    label_sets = {"_SERVER": ("model", "replica")}
    metrics: dict[str, set[str]] = {}
    pattern = r'(Counter|Gauge|Histogram)\(\s*"(gptoss_\w+)",(.*?)\)\.set_default_tags'
    for kind, name, rest in re.findall(pattern, source, re.S):
        labels = set(re.findall(r'"(\w+)"', rest.split("BUCKETS_S")[-1] if kind == "Histogram" else rest))
        labels |= {label for alias, names in label_sets.items() if alias in rest for label in names}
        labels = {label for label in labels if label in ("model", "replica", "rank", "layer", "expert",
                                                         "finished_reason", "status", "api", "reason", "outcome", "when", "path")}
        series = [f"ray_{name}{suffix}" for suffix in ("_bucket", "_count", "_sum")] if kind == "Histogram" \
            else [f"ray_{name}"]
        for s in series:
            metrics[s] = labels | ({"le"} if s.endswith("_bucket") else set())
    return metrics


def test_the_definitions_are_found():
    metrics = exported_metrics()
    assert "ray_gptoss_time_to_first_token_seconds_bucket" in metrics
    assert metrics["ray_gptoss_expert_tokens_total"] == {"model", "replica", "layer", "expert"}
    assert metrics["ray_gptoss_request_errors_total"] == {"model", "status", "api"}


def test_every_dashboard_query_names_exported_metrics_and_their_labels():
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "gptoss-serve.json").read_text())
    metrics = exported_metrics()
    queries = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    queries += [v["query"]["query"] for v in dashboard["templating"]["list"] if isinstance(v.get("query"), dict)]
    assert len(queries) > 20
    used = set()
    for query in queries:
        for name, selector in re.findall(r"(ray_gptoss_\w+)(\{[^}]*\})?", query):
            assert name in metrics, f"{name} is not exported (query: {query})"
            used.add(name.removesuffix("_bucket").removesuffix("_count").removesuffix("_sum"))
            for label in re.findall(r"(\w+)\s*=~?", selector):
                assert label in metrics[name], f"{name} has no label {label!r} (query: {query})"
        for grouped in re.findall(r"by \(([^)]*)\)", query):
            for label in (g.strip() for g in grouped.split(",")):
                names = re.findall(r"ray_gptoss_\w+", query)
                assert any(label in metrics[n] for n in names), f"no metric of {query} has label {label!r}"
    defined = {n.removesuffix("_bucket").removesuffix("_count").removesuffix("_sum") for n in metrics}
    assert defined - used == set(), f"metrics no panel shows: {sorted(defined - used)}"
