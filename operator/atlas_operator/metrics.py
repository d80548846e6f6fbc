"""The operator's Prometheus metrics, served on ``ATLAS_METRICS_PORT`` (default 8082).

Built at scrape time from the last write-back cycle's snapshot (a custom collector): no gauge
bookkeeping per subject per cycle, and a deleted object's series vanish with it. Labels are
``namespace``/``name`` (plus ``key`` = ``namespace/name``, the gateway metrics' label, for
joins); never key material.

* ``atlas_budget_exhaustion_seconds{namespace,name,kind,budget}``: seconds until the budget
  runs out at the current burn rate, present only while it runs out before it resets.
* ``atlas_budget_burn_tokens_per_hour{namespace,name,kind}``: the forecast's burn rate.
* ``atlas_key_info{namespace,name,key,quota}``: 1 per AtlasKey; lets a dashboard filter gateway
  metrics (labelled ``key``) by namespace and AtlasQuota.
* ``atlas_operator_write_back_seconds`` / ``_subjects`` / ``_patches`` / ``_deferred``: the last
  cycle (deferred: status changes left for later cycles by the write rate);
  ``atlas_operator_status_lag_seconds``: how long the status furthest behind Redis has been
  (pacing.py), as of the last cycle's end.
* ``atlas_operator_object_failures_total{loop,kind,namespace,name}``: failures of one object in
  one loop or handler (failures.py); ``atlas_operator_failing_objects{loop}``: objects failing
  now; ``atlas_operator_loop_failures_total{loop}``: whole cycles that failed (Redis or the API
  server unreachable).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterable

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from .failures import Failures
from .forecast import Forecast


@dataclass
class Snapshot:
    forecasts: list[tuple[str, str, str, Forecast]] = field(default_factory=list)
    keys: list[tuple[str, str, str]] = field(default_factory=list)  # namespace, name, quota ("" none)
    cycle_seconds: float | None = None
    subjects: int = 0
    patches: int = 0
    deferred: int = 0
    lag_seconds: float = 0.0


class OperatorCollector:
    def __init__(self, failures: Failures | None = None) -> None:
        self.snapshot = Snapshot()
        self.failures = failures or Failures()

    def describe(self) -> Iterable:
        return []  # the families depend on the snapshot; nothing to pre-register

    def collect(self) -> Iterable[GaugeMetricFamily | CounterMetricFamily]:
        snap = self.snapshot
        now = time.time()
        exhaustion = GaugeMetricFamily(
            "atlas_budget_exhaustion_seconds",
            "Seconds until a day/month budget runs out at the observed burn rate (only when before it resets)",
            labels=["namespace", "name", "kind", "budget"],
        )
        burn = GaugeMetricFamily(
            "atlas_budget_burn_tokens_per_hour",
            "Burn rate the forecast uses (faster of the recent and the long window)",
            labels=["namespace", "name", "kind"],
        )
        for namespace, name, kind, forecast in snap.forecasts:
            burn.add_metric([namespace, name, kind], forecast.rate.tokens_per_hour)
            for ex in forecast.exhaustions:
                exhaustion.add_metric([namespace, name, kind, ex.budget.name], max(0.0, ex.at.timestamp() - now))
        info = GaugeMetricFamily(
            "atlas_key_info",
            "One per AtlasKey: its namespace, name and AtlasQuota",
            labels=["namespace", "name", "key", "quota"],
        )
        for namespace, name, quota in snap.keys:
            info.add_metric([namespace, name, f"{namespace}/{name}", quota], 1)
        yield exhaustion
        yield burn
        yield info
        if snap.cycle_seconds is not None:
            yield GaugeMetricFamily(
                "atlas_operator_write_back_seconds",
                "Duration of the last usage write-back cycle",
                value=snap.cycle_seconds,
            )
            yield GaugeMetricFamily(
                "atlas_operator_write_back_subjects", "Subjects read by the last cycle", value=snap.subjects
            )
            yield GaugeMetricFamily(
                "atlas_operator_write_back_patches", "Status patches written by the last cycle", value=snap.patches
            )
            yield GaugeMetricFamily(
                "atlas_operator_write_back_deferred",
                "Status changes the last cycle left for later ones (the write rate)",
                value=snap.deferred,
            )
            yield GaugeMetricFamily(
                "atlas_operator_status_lag_seconds",
                "Seconds the status furthest behind Redis has been so (end of the last cycle)",
                value=snap.lag_seconds,
            )
        yield from self._failures()

    def _failures(self) -> Iterable[GaugeMetricFamily | CounterMetricFamily]:
        # copies: the operator's loop updates these while a scrape (another thread) reads them
        counts, failing = dict(self.failures.counts), dict(self.failures.failing)
        loop_counts = dict(self.failures.loop_counts)
        by_object = CounterMetricFamily(
            "atlas_operator_object_failures",
            "Failures of one object in one loop or handler (the others went on)",
            labels=["loop", "kind", "namespace", "name"],
        )
        for labels, count in counts.items():
            by_object.add_metric(list(labels), count)
        now_failing = GaugeMetricFamily(
            "atlas_operator_failing_objects", "Objects whose last attempt in this loop failed", labels=["loop"]
        )
        per_loop: dict[str, int] = {}
        for loop, *_ in failing:
            per_loop[loop] = per_loop.get(loop, 0) + 1
        for loop, count in per_loop.items():
            now_failing.add_metric([loop], count)
        cycles = CounterMetricFamily(
            "atlas_operator_loop_failures",
            "Whole cycles of a loop that failed (Redis or the API server unreachable)",
            labels=["loop"],
        )
        for loop, count in loop_counts.items():
            cycles.add_metric([loop], count)
        yield by_object
        yield now_failing
        yield cycles


def serve(collector: OperatorCollector, host: str, port: int):
    """Start the metrics endpoint (a daemon thread); returns (server, thread)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return start_http_server(port, addr=host, registry=registry)
