"""The Lua scripts against a real redis-server under real concurrency."""

from __future__ import annotations

import asyncio
from datetime import datetime, timezone

import redis.asyncio as aioredis

from atlas_core import contract
from atlas_gateway.auth.principal import Principal
from atlas_gateway.ledger.admission import Admission
from atlas_gateway.ledger.limits import CONCURRENCY, DAY
from atlas_gateway.store.fastredis import FastRedis


def principal(limits: contract.Limits, quota: contract.Limits | None = None) -> Principal:
    key = contract.KeyConfig("team", "app", "0123abcd", limits, quota="shared" if quota else None)
    return Principal(key, contract.QuotaConfig("team", "shared", quota) if quota else None)


async def _concurrent_admissions(admission: Admission, p: Principal, n: int, reserve: int):
    return await asyncio.gather(*(admission.admit(p, f"req-{i}", reserve) for i in range(n)))


async def test_200_concurrent_admissions_never_overshoot_a_budget_for_20(redis_url):
    fast = FastRedis(redis_url)
    client = aioredis.from_url(redis_url)
    try:
        # two gateways' worth of clients (the fast one and redis-py), racing on one budget
        admissions = [Admission(lease_ttl_seconds=60, fast=fast), Admission(client, 60)]
        p = principal(contract.Limits(tokens_per_day=20 * 100), contract.Limits(tokens_per_month=10**9))
        decisions = await asyncio.gather(*(admissions[i % 2].admit(p, f"req-{i}", 100) for i in range(200)))
        admitted = [i for i, d in enumerate(decisions) if d.admitted]
        assert len(admitted) == 20
        assert all(d.reason == DAY for d in decisions if not d.admitted)
        subject = contract.key_subject("team", "app")
        assert await client.hlen(contract.lease_tokens_key(subject, p.tag)) == 20
        # settle all with their full reservation: settled == budget, nothing live, no room left
        await asyncio.gather(*(admissions[0].settle(p, f"req-{i}", 100, 100) for i in admitted))
        usage = (await contract.read_usages(client, [subject], datetime.now(timezone.utc), {subject: p.tag}))[subject]
        assert usage.tokens_today == 2000 and usage.requests_today == 20
        assert not (await admissions[0].admit(p, "late", 1)).admitted
        assert await client.zcard(contract.lease_key(subject, p.tag)) == 0
    finally:
        await fast.aclose()
        await client.aclose()


async def test_concurrency_slots_are_exact_under_contention(redis_url):
    fast = FastRedis(redis_url)
    try:
        admission = Admission(lease_ttl_seconds=60, fast=fast)
        p = principal(contract.Limits(max_concurrent=5))
        decisions = await _concurrent_admissions(admission, p, 100, 1)
        assert sum(d.admitted for d in decisions) == 5
        assert {d.reason for d in decisions if not d.admitted} == {CONCURRENCY}
    finally:
        await fast.aclose()


async def test_script_reloaded_after_script_flush(redis_url):
    fast = FastRedis(redis_url)
    client = aioredis.from_url(redis_url)
    try:
        admission = Admission(lease_ttl_seconds=60, fast=fast)
        p = principal(contract.Limits(tokens_per_day=1000))
        assert (await admission.admit(p, "a", 10)).admitted
        await client.script_flush()  # what a Redis restart does to the script cache
        assert (await admission.admit(p, "b", 10)).admitted
        assert await client.hlen(contract.lease_tokens_key(contract.key_subject("team", "app"))) == 2
    finally:
        await fast.aclose()
        await client.aclose()


async def test_fast_client_reports_a_dead_server_and_reconnects(redis_server, redis_url):
    fast = FastRedis(redis_url, timeout=0.5)
    try:
        assert await fast.execute(b"PING") == b"PONG"
        redis_server.stop()
        try:
            await fast.execute(b"PING")
            raise AssertionError("PING succeeded with Redis stopped")
        except (ConnectionError, OSError, TimeoutError):
            pass
        redis_server.start()
        assert await fast.execute(b"PING") == b"PONG"
    finally:
        await fast.aclose()
