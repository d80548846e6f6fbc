"""The capacity view's gateway metrics, through a real gateway process and redis-server:
tokens admitted, settled and refused per model, the upstream's in-flight gauge and latency."""

from __future__ import annotations

import threading

import httpx
from prometheus_client.parser import text_string_to_metric_families

from atlas_core import contract
from atlas_devstack.waiting import wait_for
from tests.fixtures.gateway import write_key

MODEL = "llama-3.1-8b-instruct"


def samples(gw) -> dict[tuple[str, tuple], float]:
    out = {}
    for family in text_string_to_metric_families(httpx.get(gw.url + "/metrics").text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(metrics, name, **labels) -> float:
    return sum(
        v for (n, ls), v in metrics.items() if n == name and all(dict(ls).get(k) == w for k, w in labels.items())
    )


def chat(gw, key, max_tokens=10, **headers):
    return httpx.post(
        gw.url + "/v1/chat/completions",
        timeout=10,
        json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens},
        headers={"Authorization": f"Bearer {key}", **headers},
    )


def test_capacity_metrics_per_model(redis_url, mock_upstream, start_gateway):
    write_key(redis_url, "sk-capacity-0001", "capacity", contract.Limits(tokens_per_day=1000))
    gw = start_gateway(redis_url, mock_upstream.url)
    assert chat(gw, "sk-capacity-0001").status_code == 200
    m = samples(gw)
    admitted = value(m, "atlas_gateway_admitted_tokens_total", model=MODEL)
    settled = value(m, "atlas_gateway_prompt_tokens_total", model=MODEL) + value(
        m, "atlas_gateway_completion_tokens_total", model=MODEL
    )
    assert admitted >= 10 and 0 < settled <= admitted  # reserved = estimate + cap; settled = real usage
    assert value(m, "atlas_gateway_upstream_latency_seconds_count", model=MODEL) == 1
    assert value(m, "atlas_gateway_upstream_inflight_requests", model=MODEL) == 0

    refused = chat(gw, "sk-capacity-0001", max_tokens=2000)  # more than the day's 1000 tokens
    assert refused.status_code == 429
    m = samples(gw)
    assert value(m, "atlas_gateway_refused_tokens_total", model=MODEL, reason="tokens_per_day") >= 2000
    assert value(m, "atlas_gateway_admitted_tokens_total", model=MODEL) == admitted  # refused: not admitted

    # while a request is upstream, the gauge counts it for its model
    slow = threading.Thread(target=chat, args=(gw, "sk-capacity-0001", 2), kwargs={"x-mock-latency-ms": "1500"})
    slow.start()
    try:
        wait_for(
            "in-flight gauge counts the slow request",
            lambda: value(samples(gw), "atlas_gateway_upstream_inflight_requests", model=MODEL) == 1,
            5,
        )
    finally:
        slow.join()
    wait_for(
        "in-flight gauge back to 0",
        lambda: value(samples(gw), "atlas_gateway_upstream_inflight_requests", model=MODEL) == 0,
        5,
    )
