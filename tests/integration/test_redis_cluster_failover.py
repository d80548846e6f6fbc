"""A master of a real Redis Cluster SIGKILLed under traffic through two gateways; its replica is
promoted. The quota's day budget runs out after the failover: no overshoot, every lease gone
within one lease TTL, no 500 (a refused-unrun call is a 503, like an unreachable Redis).

The figures (requests failed and for how long, the promotion time) are printed (-s)."""

from __future__ import annotations

import asyncio
import time
from datetime import datetime, timezone

import aiohttp
import httpx
from prometheus_client.parser import text_string_to_metric_families

from atlas_core import cluster, contract
from atlas_devstack.waiting import wait_for, wait_for_async
from atlas_gateway.metering.bounds import Meter
from atlas_gateway.routes import route
from atlas_gateway.settings import Settings
from tests.fixtures.gateway import write_key

MODEL = "llama-3.1-8b-instruct"
BODY = {"model": MODEL, "messages": [{"role": "user", "content": "Count to ten."}], "max_tokens": 20}
LEASE_TTL = 5.0
BUDGET_REQUESTS = 150  # the quota's day budget fits this many


def _undo_pending(gw) -> float:
    for family in text_string_to_metric_families(httpx.get(gw.url + "/metrics").text):
        if family.name == "atlas_gateway_redis_undo_pending":
            return sum(s.value for s in family.samples)
    return 0.0


async def test_master_killed_under_traffic_no_overshoot_leases_recovered(
    redis_cluster, cluster_client, mock_upstream, start_gateway
):
    bound = Meter.from_settings(Settings(upstream_url="http://unused")).bound(route("chat"), BODY)
    budget = BUDGET_REQUESTS * bound.reserve
    for name in ("one", "two"):
        write_key(
            redis_cluster.url,
            f"sk-f-{name}",
            name,
            contract.Limits(max_concurrent=64),
            quota="pool",
            quota_limits=contract.Limits(tokens_per_day=budget, max_concurrent=128),
        )
    env = {"ATLAS_REDIS_CLUSTER": "true", "ATLAS_LEASE_TTL_SECONDS": str(LEASE_TTL)}
    gateways = [start_gateway(redis_cluster.url, mock_upstream.url, **env) for _ in range(2)]
    headers = {
        "x-mock-latency-ms": "20",
        "x-mock-prompt-tokens": str(bound.prompt),
        "x-mock-completion-tokens": str(bound.reserve - bound.prompt),
    }
    slot = cluster.key_slot(contract.quota_subject("team", "pool"))

    results: list[tuple[float, int]] = []  # (monotonic time, status)
    errors: set[bytes] = set()  # distinct 5xx bodies, for the report
    stop = asyncio.Event()

    async def worker(session: aiohttp.ClientSession, i: int) -> None:
        gw, key = gateways[i % 2], ("sk-f-one", "sk-f-two")[(i // 2) % 2]
        while not stop.is_set():
            try:
                async with session.post(
                    gw.url + "/v1/chat/completions", json=BODY, headers={**headers, "authorization": f"Bearer {key}"}
                ) as resp:
                    body = await resp.read()
                    results.append((time.monotonic(), resp.status))
                    if resp.status >= 500:
                        errors.add(body[:200])
            except aiohttp.ClientError:
                results.append((time.monotonic(), 0))

    def admitted() -> int:
        return sum(1 for _, s in results if s == 200)

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        workers = [asyncio.create_task(worker(session, i)) for i in range(16)]
        try:
            await wait_for_async("traffic before the kill", lambda: admitted() >= 40, 30)
            killed_at = time.monotonic()
            master, replica = redis_cluster.kill_master_of(slot)
            promotion = await asyncio.to_thread(redis_cluster.wait_promoted, replica, 30)
            # traffic goes on until the budget is spent (429s from the promoted master)
            await wait_for_async(
                "the budget to run out after the failover",
                lambda: sum(1 for t, s in results if s == 429 and t > killed_at) >= 50,
                60,
            )
        finally:
            stop.set()
            await asyncio.gather(*workers)
    stopped_at = time.monotonic()

    statuses = [s for _, s in results]
    failed = [(t, s) for t, s in results if s not in (200, 429)]
    logged = [line for gw in gateways for line in gw.log().splitlines()[-200:] if "Error" in line or "ERROR" in line]
    assert 500 not in statuses, f"a refused-unrun call must be a 503, never a 500: {errors} {logged[-30:]}"
    assert set(statuses) <= {200, 429, 503}, sorted(set(statuses))
    # No overshoot: what the upstream generated for admitted requests fits the budget
    assert admitted() * bound.reserve <= budget, (admitted(), BUDGET_REQUESTS)
    quota_day, _ = contract.usage_keys(contract.quota_subject("team", "pool"), datetime.now(timezone.utc))
    settled = int(cluster_client.hget(quota_day, "settled") or 0)
    assert settled <= budget

    # Every lease released (settled, undone or expired) within one lease TTL of the traffic's end
    lease_keys = [
        contract.lease_key(s, contract.quota_subject("team", "pool"))
        for s in (
            contract.quota_subject("team", "pool"),
            contract.key_subject("team", "one"),
            contract.key_subject("team", "two"),
        )
    ]
    wait_for("every lease gone", lambda: all(cluster_client.zcard(k) == 0 for k in lease_keys), LEASE_TTL)
    leases_gone_after = time.monotonic() - stopped_at
    wait_for("no undo pending", lambda: all(_undo_pending(gw) == 0 for gw in gateways), LEASE_TTL)

    window = (failed[-1][0] - failed[0][0]) if failed else 0.0
    print(
        f"\nfailover: master :{master.port} SIGKILLed, replica :{replica.port} promoted after "
        f"{promotion:.2f}s; {len(results)} requests: {admitted()} admitted, {statuses.count(429)} refused "
        f"(429), {len(failed)} failed (503) over {window:.2f}s (first {failed[0][0] - killed_at:.2f}s after "
        f"the kill)"
        if failed
        else "no request failed"
    )
    print(
        f"failover: settled {settled} of {budget} tokens ({admitted()} x {bound.reserve} = "
        f"{admitted() * bound.reserve} admitted); leases gone {leases_gone_after:.2f}s after the traffic"
    )
    # traffic recovered: requests were admitted after the failures ended
    assert (
        failed == []
        or any(s == 200 for t, s in results if t > failed[-1][0])
        or any(s == 429 for t, s in results if t > failed[-1][0])
    )
