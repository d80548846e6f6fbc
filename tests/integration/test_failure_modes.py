"""Redis outages seen through a real gateway process: fail-closed (default) and fail-open,
and recovery without a restart when Redis comes back on the same address."""

from __future__ import annotations

import httpx
import pytest

from atlas_core import contract
from atlas_devstack.redis_server import RedisServer
from atlas_devstack.waiting import wait_for
from tests.fixtures.gateway import write_key

BODY = {"model": "llama-3.1-8b-instruct", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}


@pytest.fixture
def own_redis():
    """A Redis of its own: these tests kill it."""
    with RedisServer() as server:
        yield server


def chat(gw, key: str) -> httpx.Response:
    return httpx.post(
        gw.url + "/v1/chat/completions", json=BODY, headers={"Authorization": f"Bearer {key}"}, timeout=10
    )


def test_fail_closed_then_recovers(own_redis, mock_upstream, start_gateway):
    write_key(own_redis.url, "sk-closed", "closed", contract.Limits(tokens_per_day=10_000))
    gw = start_gateway(own_redis.url, mock_upstream.url, ATLAS_CONFIG_TTL_SECONDS="0.2")
    assert chat(gw, "sk-closed").status_code == 200
    assert httpx.get(gw.url + "/readyz").status_code == 200

    own_redis.kill()  # SIGKILL: a crash, not a clean shutdown
    refused = chat(gw, "sk-closed")
    assert refused.status_code == 503
    assert refused.json()["error"]["type"] == "server_error"
    assert refused.headers["x-request-id"]
    assert httpx.get(gw.url + "/readyz").status_code == 503

    own_redis.start()  # same port, empty data (no persistence): write the config again
    write_key(own_redis.url, "sk-closed", "closed", contract.Limits(tokens_per_day=10_000))
    wait_for("recovery after Redis restart", lambda: chat(gw, "sk-closed").status_code == 200, 10)
    assert "redis_errors_total" in httpx.get(gw.url + "/metrics").text


def test_fail_open_passes_with_metric_and_log_line(own_redis, mock_upstream, start_gateway):
    write_key(own_redis.url, "sk-open", "open", contract.Limits(tokens_per_day=10_000))
    gw = start_gateway(own_redis.url, mock_upstream.url, ATLAS_FAIL_MODE="open", ATLAS_CONFIG_TTL_SECONDS="0.2")
    assert chat(gw, "sk-open").status_code == 200  # caches the key

    own_redis.stop()
    passed = chat(gw, "sk-open")
    assert passed.status_code == 200
    assert chat(gw, "sk-never-seen").status_code == 503  # an unknown key is never let through
    metrics = httpx.get(gw.url + "/metrics").text
    assert any(
        line.startswith("atlas_gateway_fail_open_total") and not line.endswith(" 0.0") for line in metrics.splitlines()
    )
    wait_for("fail-open log line", lambda: "failing open" in gw.log(), 5)

    own_redis.start()
    write_key(own_redis.url, "sk-open", "open", contract.Limits(tokens_per_day=10_000))
    wait_for(
        "limits enforced again", lambda: chat(gw, "sk-open").headers.get("x-ratelimit-limit-tokens") == "10000", 10
    )
    wait_for("recovery log line", lambda: "reachable again" in gw.log(), 5)


def test_workload_identity_tokens_follow_the_fail_mode(own_redis, mock_upstream, start_gateway):
    """Fail-open serves a token seen before as its AtlasKey; a new token (unverifiable without
    the issuers in Redis) is a 503, never let through; fail-closed refuses both."""
    from benchmarks.token_auth import write_token_binding

    def bound_token(account: str) -> str:
        return write_token_binding(own_redis.url, namespace="team", key_name="open", api_key="sk-open", account=account)

    write_key(own_redis.url, "sk-open", "open", contract.Limits(tokens_per_day=10_000))
    seen, unseen = bound_token("runner"), bound_token("other")
    opened = start_gateway(own_redis.url, mock_upstream.url, ATLAS_FAIL_MODE="open", ATLAS_CONFIG_TTL_SECONDS="0.2")
    closed = start_gateway(own_redis.url, mock_upstream.url, ATLAS_CONFIG_TTL_SECONDS="0.2")
    for gw in (opened, closed):
        assert chat(gw, seen).status_code == 200
    own_redis.stop()
    assert chat(opened, seen).status_code == 200
    for gw, token in ((opened, unseen), (closed, seen), (closed, unseen)):
        refused = chat(gw, token)
        assert refused.status_code == 503 and refused.json()["error"]["type"] == "server_error"
