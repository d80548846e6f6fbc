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
* ``atlas_operator_write_back_seconds`` / ``_subjects`` / ``_patches``: the last cycle.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterable

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import GaugeMetricFamily

from .forecast import Forecast


@dataclass
class Snapshot:
    forecasts: list[tuple[str, str, str, Forecast]] = field(default_factory=list)
    keys: list[tuple[str, str, str]] = field(default_factory=list)  # namespace, name, quota ("" none)
    cycle_seconds: float | None = None
    subjects: int = 0
    patches: int = 0


class OperatorCollector:
    def __init__(self) -> None:
        self.snapshot = Snapshot()

    def describe(self) -> Iterable:
        return []  # the families depend on the snapshot; nothing to pre-register

    def collect(self) -> Iterable[GaugeMetricFamily]:
        snap = self.snapshot
        now = time.time()
        exhaustion = GaugeMetricFamily(
            "atlas_budget_exhaustion_seconds",
            "Seconds until a day/month budget runs out at the observed burn rate (only when before it resets)",
            labels=["namespace", "name", "kind", "budget"])
        burn = GaugeMetricFamily("atlas_budget_burn_tokens_per_hour",
                                 "Burn rate the forecast uses (faster of the recent and the long window)",
                                 labels=["namespace", "name", "kind"])
        for namespace, name, kind, forecast in snap.forecasts:
            burn.add_metric([namespace, name, kind], forecast.rate.tokens_per_hour)
            for ex in forecast.exhaustions:
                exhaustion.add_metric([namespace, name, kind, ex.budget.name], max(0.0, ex.at.timestamp() - now))
        info = GaugeMetricFamily("atlas_key_info", "One per AtlasKey: its namespace, name and AtlasQuota",
                                 labels=["namespace", "name", "key", "quota"])
        for namespace, name, quota in snap.keys:
            info.add_metric([namespace, name, f"{namespace}/{name}", quota], 1)
        yield exhaustion
        yield burn
        yield info
        if snap.cycle_seconds is not None:
            yield GaugeMetricFamily("atlas_operator_write_back_seconds", "Duration of the last usage write-back cycle",
                                    value=snap.cycle_seconds)
            yield GaugeMetricFamily("atlas_operator_write_back_subjects", "Subjects read by the last cycle",
                                    value=snap.subjects)
            yield GaugeMetricFamily("atlas_operator_write_back_patches", "Status patches written by the last cycle",
                                    value=snap.patches)


def serve(collector: OperatorCollector, host: str, port: int):
    """Start the metrics endpoint (a daemon thread); returns (server, thread)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return start_http_server(port, addr=host, registry=registry)
