"""Redis faults seen through a real gateway process and a real redis-server (issue 10, cases
1-3): a stall longer than the admission timeout (SIGSTOP/SIGCONT), a settlement that times out
on a Redis that lost its scripts, reconnects with a password and a database other than 0, a
failed AUTH, and error replies (script error, OOM, NOAUTH) that must never let traffic through.
"""

from __future__ import annotations

import asyncio
import re
import threading
from datetime import datetime, timezone

import httpx
import pytest
import redis
import redis.asyncio as aioredis

from atlas_core import contract
from atlas_devstack.redis_server import RedisServer
from atlas_devstack.waiting import wait_for
from atlas_gateway.metering.bounds import Meter
from atlas_gateway.routes import route
from tests.fixtures.gateway import write_key

MODEL = "llama-3.1-8b-instruct"
BODY = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}


@pytest.fixture
def own_redis():
    """A Redis of its own: these tests stall, restart and reconfigure it."""
    with RedisServer() as server:
        yield server


def chat(gw, key: str, headers: dict | None = None, timeout: float = 10) -> httpx.Response:
    return httpx.post(
        gw.url + "/v1/chat/completions",
        json=BODY,
        timeout=timeout,
        headers={"Authorization": f"Bearer {key}", **(headers or {})},
    )


def metric(gw, name: str, **labels: str) -> float:
    """Sum of a metric's samples whose labels include ``labels``."""
    total = 0.0
    for line in httpx.get(gw.url + "/metrics").text.splitlines():
        if not line.startswith(name):
            continue
        m = re.match(r"^([a-z_]+)(\{[^}]*\})? (\S+)$", line)
        if not m or m.group(1) != name:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
        if all(found.get(k) == v for k, v in labels.items()):
            total += float(m.group(3))
    return total


def subject(name: str) -> str:
    return contract.key_subject("team", name)


def leases(r: redis.Redis, name: str) -> tuple[int, int]:
    return r.zcard(contract.lease_key(subject(name))), r.hlen(contract.lease_tokens_key(subject(name)))


def settled_today(r: redis.Redis, name: str) -> int:
    day_key, _ = contract.usage_keys(subject(name), datetime.now(timezone.utc))
    return int(r.hget(day_key, "settled") or 0)


# ----------------------------------------------------------------------------- 1. stalls


@pytest.mark.parametrize("mode", ["closed", "open"])
def test_admission_that_timed_out_leaves_no_lease(own_redis, mock_upstream, start_gateway, mode):
    """Redis stalls longer than the admission timeout: the client gets 503 (or, failing open,
    passes unchecked); when Redis resumes it runs the queued admissions. The gateway undoes them:
    no lease and no reservation outlive the stall, although the lease TTL is five minutes."""
    write_key(own_redis.url, "sk-stall", "stall", contract.Limits(max_concurrent=1, tokens_per_day=100_000))
    gw = start_gateway(
        own_redis.url,
        mock_upstream.url,
        ATLAS_FAIL_MODE=mode,
        ATLAS_REDIS_TIMEOUT_SECONDS="0.3",
        ATLAS_CONFIG_TTL_SECONDS="3600",
        ATLAS_LEASE_TTL_SECONDS="300",
    )
    r = redis.Redis.from_url(own_redis.url)
    assert chat(gw, "sk-stall").status_code == 200  # caches the key's config

    own_redis.pause()
    try:
        statuses = [chat(gw, "sk-stall").status_code for _ in range(5)]
    finally:
        own_redis.resume()
    assert statuses == ([503] * 5 if mode == "closed" else [200] * 5)

    wait_for(
        "undo of the timed-out admissions",
        lambda: (
            metric(gw, "atlas_gateway_redis_undo_pending") == 0 and metric(gw, "atlas_gateway_redis_undone_total") >= 5
        ),
        10,
    )
    # a full request after the undo: Redis has run everything that was queued behind the stall
    settled_before = settled_today(r, "stall")
    ok = chat(gw, "sk-stall")
    assert ok.status_code == 200, f"maxConcurrent=1 key refused after the stall: {ok.status_code} {ok.text}"
    # the answer goes out before its settlement: its own lease is gone a moment later
    wait_for(f"no lease left (now {leases(r, 'stall')})", lambda: leases(r, "stall") == (0, 0), 2)
    # no phantom reservation: what is left is the budget minus what was settled and this request
    reserve = Meter(4096).bound(route("chat"), dict(BODY)).reserve
    assert int(ok.headers["x-ratelimit-remaining-tokens"]) == 100_000 - settled_before - reserve
    r.close()


def test_settlement_that_timed_out_is_settled_once_redis_answers(own_redis, mock_upstream, start_gateway):
    """The upstream answers while Redis is stalled and has lost its scripts: the settlement
    times out. The gateway settles it (NOSCRIPT, load, run) once Redis answers: the lease is
    gone and the tokens are billed exactly once."""
    write_key(own_redis.url, "sk-settle", "settle", contract.Limits(max_concurrent=2, tokens_per_day=100_000))
    gw = start_gateway(
        own_redis.url,
        mock_upstream.url,
        ATLAS_REDIS_TIMEOUT_SECONDS="0.3",
        ATLAS_CONFIG_TTL_SECONDS="3600",
        ATLAS_LEASE_TTL_SECONDS="300",
    )
    r = redis.Redis.from_url(own_redis.url)
    assert chat(gw, "sk-settle").status_code == 200
    wait_for("the first request's settlement", lambda: leases(r, "settle") == (0, 0), 2)
    before = settled_today(r, "settle")

    result: dict = {}
    slow = threading.Thread(
        target=lambda: result.setdefault(
            "resp", chat(gw, "sk-settle", {"x-mock-latency-ms": "1500", "x-mock-completion-tokens": "4"})
        )
    )
    slow.start()
    wait_for("the slow request's lease", lambda: leases(r, "settle")[0] == 1, 5)
    r.script_flush()  # as after a restart: the settlement's EVALSHA meets NOSCRIPT
    own_redis.pause()
    try:
        slow.join(10)
        assert result["resp"].status_code == 200  # the client is answered before settlement
        billed = result["resp"].json()["usage"]["total_tokens"]
        wait_for(
            "the settlement to time out", lambda: metric(gw, "atlas_gateway_redis_errors_total", op="settle") >= 1, 5
        )
    finally:
        own_redis.resume()
    wait_for(
        "the late settlement",
        lambda: metric(gw, "atlas_gateway_redis_undo_pending") == 0 and leases(r, "settle") == (0, 0),
        10,
    )
    assert settled_today(r, "settle") - before == billed
    r.close()


# ----------------------------------------------------------------------- 2. handshake


def test_reconnects_use_the_configured_database_and_password(mock_upstream, start_gateway):
    """Password and database 3; the gateway's connections are killed every 10 ms while 300
    requests arrive, 20 at a time. Every admission runs in database 3 (whose budget is spent): none is
    admitted, and database 0 never sees a counter."""
    with RedisServer(password="s3cret-pw") as rs:
        url = rs.url_for(3)
        write_key(url, "sk-db", "db", contract.Limits(tokens_per_day=1_000))
        data = redis.Redis.from_url(url)
        day_key, _ = contract.usage_keys(subject("db"), datetime.now(timezone.utc))
        data.hset(day_key, "settled", 1_000)  # the budget is spent
        admin = redis.Redis.from_url(rs.url_for(0))
        gw = start_gateway(url, mock_upstream.url, ATLAS_CONFIG_TTL_SECONDS="3600")
        assert chat(gw, "sk-db").status_code == 429

        async def run() -> list[int]:
            statuses: list[int] = []
            done = asyncio.Event()

            async def killer() -> None:  # drop the gateway's connections again and again
                killer_client = aioredis.Redis.from_url(rs.url_for(0))
                while not done.is_set():
                    await killer_client.client_kill_filter(_type="normal", skipme=True)
                    try:
                        await asyncio.wait_for(done.wait(), 0.01)
                    except asyncio.TimeoutError:
                        pass
                await killer_client.aclose()

            async with httpx.AsyncClient(timeout=10, limits=httpx.Limits(max_connections=20)) as client:

                async def worker() -> None:
                    for _ in range(15):
                        resp = await client.post(
                            gw.url + "/v1/chat/completions", json=BODY, headers={"Authorization": "Bearer sk-db"}
                        )
                        statuses.append(resp.status_code)

                kill = asyncio.ensure_future(killer())
                await asyncio.gather(*(worker() for _ in range(20)))
                done.set()
                await kill
            return statuses

        statuses = asyncio.run(run())
        admitted = statuses.count(200)
        assert admitted == 0, f"{admitted} of {len(statuses)} admitted past a spent budget"
        # a request whose connection was killed under it is a 503 (fail-closed); never a 200
        assert set(statuses) <= {429, 503} and statuses.count(429) > len(statuses) // 2, statuses
        assert admin.keys("atlas:v2:*") == [], "counters written to database 0"
        data.close()
        admin.close()


def test_failed_auth_is_not_left_in_place(mock_upstream, start_gateway):
    """The password changes under the gateway: reconnects fail AUTH. Requests get a 500 (never
    let through, although failing open), /readyz says why; once the password is back the next
    request reconnects and authenticates: no unauthenticated connection stays in place."""
    with RedisServer(password="first-pw") as rs:
        url = rs.url_for(2)
        write_key(url, "sk-auth", "auth", contract.Limits(tokens_per_day=100_000))
        gw = start_gateway(url, mock_upstream.url, ATLAS_FAIL_MODE="open", ATLAS_CONFIG_TTL_SECONDS="3600")
        assert chat(gw, "sk-auth").status_code == 200
        admin = redis.Redis.from_url(rs.url_for(0))
        admin.config_set("requirepass", "second-pw")
        admin.client_kill_filter(_type="normal", skipme=True)
        refused = chat(gw, "sk-auth")
        assert refused.status_code == 500, refused.text
        assert refused.json()["error"]["code"] == "quota_store_error"
        ready = httpx.get(gw.url + "/readyz")
        assert ready.status_code == 503 and ("WRONGPASS" in ready.text or "NOAUTH" in ready.text), ready.text
        assert metric(gw, "atlas_gateway_fail_open_total") == 0
        assert metric(gw, "atlas_gateway_redis_reply_errors_total", op="admit") >= 1

        admin = redis.Redis(host="127.0.0.1", port=rs.port, password="second-pw")
        admin.config_set("requirepass", "first-pw")
        wait_for("recovery with the right password", lambda: chat(gw, "sk-auth").status_code == 200, 5)
        assert httpx.get(gw.url + "/readyz").status_code == 200
        admin.close()


# --------------------------------------------------------------------- 3. error replies


@pytest.mark.parametrize("fault", ["script_error", "oom"])
def test_error_replies_never_let_traffic_through(own_redis, mock_upstream, start_gateway, fault):
    """Failing open is for an unreachable Redis only. A Lua error (here: a lease key of the
    wrong type) or an OOM reply is a 500 with its own metric, and nothing reaches the upstream."""
    write_key(own_redis.url, "sk-reply", "reply", contract.Limits(max_concurrent=5, tokens_per_day=100_000))
    gw = start_gateway(own_redis.url, mock_upstream.url, ATLAS_FAIL_MODE="open", ATLAS_CONFIG_TTL_SECONDS="3600")
    r = redis.Redis.from_url(own_redis.url)
    assert chat(gw, "sk-reply").status_code == 200
    if fault == "script_error":
        r.delete(contract.lease_key(subject("reply")))
        r.set(contract.lease_key(subject("reply")), "not a zset")
    else:
        r.config_set("maxmemory", "1")
    try:
        statuses = [chat(gw, "sk-reply").status_code for _ in range(5)]
        assert statuses == [500] * 5, statuses
        kind = "WRONGTYPE" if fault == "script_error" else "OOM"  # Redis 7 passes the code through
        assert metric(gw, "atlas_gateway_redis_reply_errors_total", op="admit", kind=kind) == 5
        assert metric(gw, "atlas_gateway_fail_open_total") == 0
        assert httpx.get(gw.url + "/readyz").status_code == 200  # Redis is reachable and answers PING
    finally:
        r.config_set("maxmemory", "0")
    r.close()


def test_readyz_asks_the_hot_path_client(own_redis, mock_upstream, start_gateway):
    """Readiness is the hot-path connection's: a Redis that demands a password the gateway
    does not have makes /readyz 503 with the reason, and fail-open lets nothing through."""
    write_key(own_redis.url, "sk-ready", "ready", contract.Limits(tokens_per_day=100_000))
    gw = start_gateway(own_redis.url, mock_upstream.url, ATLAS_FAIL_MODE="open", ATLAS_CONFIG_TTL_SECONDS="3600")
    assert chat(gw, "sk-ready").status_code == 200
    assert httpx.get(gw.url + "/readyz").status_code == 200
    admin = redis.Redis.from_url(own_redis.url)
    admin.config_set("requirepass", "now-required")
    admin.client_kill_filter(_type="normal", skipme=True)
    admin.close()
    ready = httpx.get(gw.url + "/readyz")
    assert ready.status_code == 503 and "NOAUTH" in ready.text, ready.text
    assert chat(gw, "sk-ready").status_code == 500
    assert metric(gw, "atlas_gateway_fail_open_total") == 0
    admin = redis.Redis(host="127.0.0.1", port=own_redis.port, password="now-required")
    admin.config_set("requirepass", "")
    admin.close()
    wait_for("ready again", lambda: httpx.get(gw.url + "/readyz").status_code == 200, 5)


def test_redis_restart_costs_no_usage_or_config_read(own_redis, mock_upstream, start_gateway):
    """After a Redis restart every pooled redis-py connection is dead. Once traffic flows again,
    the first /v1/usage (and config read) must not be the one that finds out: 200, not 503."""
    write_key(own_redis.url, "sk-restart", "restart", contract.Limits(tokens_per_day=100_000))
    gw = start_gateway(own_redis.url, mock_upstream.url, ATLAS_CONFIG_TTL_SECONDS="3600")
    headers = {"Authorization": "Bearer sk-restart"}
    assert chat(gw, "sk-restart").status_code == 200
    assert httpx.get(gw.url + "/v1/usage", headers=headers).status_code == 200  # a pooled connection
    own_redis.stop()
    assert chat(gw, "sk-restart").status_code == 503
    own_redis.start()
    write_key(own_redis.url, "sk-restart", "restart", contract.Limits(tokens_per_day=100_000))
    wait_for("traffic to recover", lambda: chat(gw, "sk-restart").status_code == 200, 10)
    usage = httpx.get(gw.url + "/v1/usage", headers=headers)
    assert usage.status_code == 200, usage.text
