"""The hot path's metric writers (metrics.py): the same samples as prometheus_client's own
``inc``/``observe`` would give, without its lock or its per-call checks."""

from __future__ import annotations

import math

from prometheus_client import CollectorRegistry, Histogram

from atlas_gateway import metrics


def _samples(metric) -> dict:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in metric.collect()
        for s in fam.samples
        if not s.name.endswith("_created")
    }


def test_histogram_observer_fills_the_buckets_prometheus_client_would():
    buckets = (0.001, 0.01, 0.1, 1.0)
    ours, theirs = (Histogram(f"h_{n}", "h", ["m"], buckets=buckets, registry=CollectorRegistry()) for n in "ab")
    observe = metrics._histogram_observer(ours.labels("x"))
    # on a bound, between bounds, below the first, past the last (+Inf), zero
    for value in (0.001, 0.0005, 0.05, 1.0, 7.5, 0.0, 0.1):
        observe(value)
        theirs.labels("x").observe(value)
    mine = {(n.replace("h_a", "h"), l): v for (n, l), v in _samples(ours).items()}
    assert mine == {(n.replace("h_b", "h"), l): v for (n, l), v in _samples(theirs).items()}
    assert mine[("h_bucket", (("le", "+Inf"), ("m", "x")))] == 7
    observe(math.nan)  # in no bucket, as in prometheus_client: not an IndexError
    assert _samples(ours)[("h_a_count", (("m", "x"),))] == 7


def test_hot_path_writers_add_to_the_exposed_counters_and_gauges():
    def value(name: str, **labels) -> float:
        return next(
            s.value
            for fam in metrics.REQUESTS.collect()
            + metrics.UPSTREAM_INFLIGHT.collect()
            + metrics.PROMPT_TOKENS.collect()
            for s in fam.samples
            if s.name == name and s.labels == labels
        )

    metrics.count_request("ns/fast-path", "m-fast", 200, "Standard")
    metrics.count_request("ns/fast-path", "m-fast", 200, "Standard")
    metrics.count_tokens("ns/fast-path", "m-fast", 12, 0)
    metrics.upstream_started("m-fast")
    metrics.upstream_started("m-fast")
    metrics.upstream_finished("m-fast")
    assert (
        value("atlas_gateway_requests_total", key="ns/fast-path", model="m-fast", status="200", priority="Standard")
        == 2
    )
    assert value("atlas_gateway_prompt_tokens_total", key="ns/fast-path", model="m-fast") == 12
    assert value("atlas_gateway_upstream_inflight_requests", model="m-fast") == 1
    assert b'atlas_gateway_requests_total{key="ns/fast-path"' in metrics.render()
