"""The Grafana dashboard the chart ships (charts/atlas/files/dashboards/atlas-gateway.json).

No helm needed: the JSON is read as Grafana would. Checks that it is valid, that every query
uses only metrics the code really exports (gateway registry, operator collector, the
kube-state-metrics config in examples/) and only labels those metrics carry, that the tenant
variables (namespace, quota, key) exist and filter every per-tenant panel, and that no metric
label could carry key material.
"""

from __future__ import annotations

import json
import re
from datetime import datetime, timezone
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "charts" / "atlas" / "files" / "dashboards" / "atlas-gateway.json"
SUFFIXES = ("", "_total", "_bucket", "_sum", "_count", "_created")
ALLOWED_LABELS = {
    "key",
    "model",
    "status",
    "priority",
    "reason",
    "op",
    "namespace",
    "name",
    "kind",
    "budget",
    "quota",
    "type",
    "le",
    "currency",
    "lease",  # lease: found/none (undo outcome)
    # the upstream's load as read (shedding/upstream_load.py): its base URL with any
    # user:password removed (display_url, unit-tested), and running/waiting
    "upstream",
    "state",
}


def gateway_metrics() -> dict[str, set[str]]:
    from prometheus_client import REGISTRY

    import atlas_gateway.metrics as gw

    out: dict[str, set[str]] = {}
    for value in vars(gw).values():
        labelnames = getattr(value, "_labelnames", None)
        name = getattr(value, "_name", None)
        if name and labelnames is not None and name.startswith("atlas_"):
            labels = set(labelnames) | ({"le"} if type(value).__name__ == "Histogram" else set())
            for suffix in SUFFIXES:
                out[name + suffix] = labels
    assert REGISTRY  # imported for its side effect of registering; nothing else needed
    return out


def operator_metrics() -> dict[str, set[str]]:
    from atlas_core.contract import Limits
    from atlas_operator import forecast as fc
    from atlas_operator.metrics import OperatorCollector, Snapshot

    now = datetime.now(timezone.utc)
    example = fc.forecast(fc.BurnRate(10.0, 300), fc.token_budgets(Limits(tokens_per_day=100), 0, 0, now), now)
    collector = OperatorCollector()
    collector.snapshot = Snapshot([("ns", "k", "AtlasKey", example)], [("ns", "k", "q")], 1.0, 1, 0)
    out = {}
    for family in collector.collect():
        labels = set()
        for sample in family.samples:
            labels |= set(sample.labels)
        out[family.name] = labels
    return out


def kube_state_metrics() -> dict[str, set[str]]:
    doc = yaml.safe_load((REPO / "examples" / "monitoring" / "kube-state-metrics-values.yaml").read_text())
    out = {}
    for res in doc["customResourceState"]["config"]["spec"]["resources"]:
        base = set(res["labelsFromPath"])
        for metric in res["metrics"]:
            extra = set((metric["each"].get("gauge") or {}).get("labelsFromPath") or {})
            out[f"{res['metricNamePrefix']}_{metric['name']}"] = base | extra
    return out


@pytest.fixture(scope="module")
def known() -> dict[str, set[str]]:
    out = gateway_metrics()
    assert "atlas_gateway_admitted_tokens_total" in out, "gateway metrics not found"
    out.update(operator_metrics())
    out.update(kube_state_metrics())
    return out


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())  # invalid JSON fails here


def panels(dashboard):
    """(row title, panel) for every non-row panel, rows in order."""
    row = ""
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            row = panel["title"]
            continue
        yield row, panel


SELECTOR = re.compile(r"\b(atlas_[a-z0-9_]+)\s*(\{[^}]*\})?")
MATCHER = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*"')


def metrics_in(expr: str) -> list[tuple[str, set[str]]]:
    """(metric, label names it is filtered on) for every Atlas metric an expression selects."""
    return [(m.group(1), {label for label, _ in MATCHER.findall(m.group(2) or "")}) for m in SELECTOR.finditer(expr)]


def test_dashboard_basics(dashboard):
    assert dashboard["uid"] == "atlas-gateway" and dashboard["title"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    cells = set()
    for panel in dashboard["panels"]:
        g = panel["gridPos"]
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & mine, f"panel {panel['title']!r} overlaps another"
        assert g["x"] + g["w"] <= 24
        cells |= mine


def test_template_variables_filter_by_tenant(dashboard, known):
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert {"datasource", "namespace", "quota", "key"} <= set(variables)
    for name in ("namespace", "quota", "key"):
        var = variables[name]
        assert var["type"] == "query" and var["includeAll"] and var["multi"] and var["allValue"] == ".*"
        for metric, labels in metrics_in(var["query"]):
            assert metric in known, (name, metric)
            assert labels <= known[metric], (name, metric, labels - known[metric])
        assert re.search(rf",\s*{name}\)$", var["query"]), "the variable lists values of its own label"
    assert "$namespace" in variables["quota"]["query"] and "$quota" in variables["key"]["query"]


def test_every_query_uses_metrics_and_labels_that_exist(dashboard, known):
    exprs = 0
    for _row, panel in panels(dashboard):
        assert panel.get("targets"), f"panel {panel['title']!r} has no query"
        for target in panel["targets"]:
            used = metrics_in(target["expr"])
            assert used, target["expr"]
            for metric, labels in used:
                assert metric in known, f"{panel['title']!r}: {metric} is not exported by the code"
                assert labels <= known[metric], f"{panel['title']!r}: {metric} has no label {labels - known[metric]}"
            for label in re.findall(r"\{\{\s*(\w+)\s*\}\}", target.get("legendFormat", "")):
                assert any(label in known[m] for m, _ in used), (panel["title"], label)
            exprs += 1
    assert exprs >= 10


def test_per_tenant_panels_are_filtered_by_the_variables(dashboard):
    tenant_rows = [r for r, _ in panels(dashboard) if r.startswith(("Tenants", "Budget forecast"))]
    assert tenant_rows, "no per-tenant rows"
    for row, panel in panels(dashboard):
        if not row.startswith(("Tenants", "Budget forecast")):
            continue
        for target in panel["targets"]:
            assert "$namespace" in target["expr"], (panel["title"], target["expr"])
            if "atlas_gateway_" in target["expr"]:  # labelled by key: joined on the operator's info metric
                assert 'atlas_key_info{namespace=~"$namespace", quota=~"$quota", key=~"$key"}' in target["expr"]


def test_capacity_row_covers_the_sizing_figures(dashboard):
    capacity = [p for r, p in panels(dashboard) if r.startswith("Capacity")]
    exprs = " ".join(t["expr"] for p in capacity for t in p["targets"])
    for metric in (
        "atlas_gateway_admitted_tokens_total",
        "atlas_gateway_refused_tokens_total",
        "atlas_gateway_completion_tokens_total",
        "atlas_gateway_upstream_inflight_requests",
        "atlas_gateway_upstream_latency_seconds_bucket",
    ):
        assert metric in exprs, metric
    assert all("by (model)" in t["expr"] or "by (le, model)" in t["expr"] for p in capacity for t in p["targets"])


def test_metric_labels_never_carry_key_material(known):
    for metric, labels in known.items():
        assert labels <= ALLOWED_LABELS, (metric, labels - ALLOWED_LABELS)
