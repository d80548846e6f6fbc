"""Shedding against a cluster-wide threshold: two gateway processes on one real Redis, each
publishing its in-flight count (inflight.lua). ``ATLAS_SHED_THRESHOLD=10`` is a total: with 4
requests held in flight on each gateway a Sheddable request still passes on both, with 6 on
each (12 in all, but only 6 per process) it is shed on both, while Standard requests pass. A
per-process count would have let each gateway reach 10 (20 in all) first.
"""

from __future__ import annotations

import asyncio
import time

import httpx
import redis

from atlas_core import contract
from tests.fixtures.gateway import until, write_key

MODEL = "llama-3.1-8b-instruct"
KEY = "sk-shared-shed"
THRESHOLD = 10


def published(r: redis.Redis) -> dict[bytes, int]:
    return {field: int(value.split(b":")[0]) for field, value in r.hgetall(contract.INFLIGHT_KEY).items()}


def test_sheddable_is_shed_at_the_shared_threshold_not_n_times_it(redis_url, mock_upstream, start_gateway):
    write_key(redis_url, KEY, "shared-shed", contract.Limits())  # Standard, no limits
    env = dict(ATLAS_SHED_THRESHOLD=str(THRESHOLD), ATLAS_SHED_PUBLISH_SECONDS="0.1")
    gateways = [start_gateway(redis_url, mock_upstream.url, **env) for _ in range(2)]
    r = redis.Redis.from_url(redis_url)
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}

    async def scenario() -> None:
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
        async with httpx.AsyncClient(timeout=60, limits=limits) as client:
            async def call(gw, priority: str = "Standard", latency_ms: int = 0) -> int:
                resp = await client.post(gw.url + "/v1/chat/completions", json=body, headers={
                    "Authorization": f"Bearer {KEY}", "x-atlas-priority": priority,
                    "x-mock-latency-ms": str(latency_ms)})
                return resp.status_code

            holders: list[asyncio.Task] = []

            def hold(per_gateway: int) -> None:
                for gw in gateways:
                    holders.extend(asyncio.ensure_future(call(gw, latency_ms=60_000)) for _ in range(per_gateway))

            def all_published(each: int) -> bool:
                counts = published(r)
                return len(counts) == 2 and all(n == each for n in counts.values())

            try:
                await until(lambda: len(published(r)) == 2, 10, "both gateways to publish")
                hold(4)
                await until(lambda: all_published(4), 10, "4 in flight published by each gateway")
                for gw in gateways:
                    assert await call(gw, "Sheddable") == 200  # 4 + 4 + the probe < 10

                hold(2)
                await until(lambda: all_published(6), 10, "6 in flight published by each gateway")

                async def shed_on_both() -> bool:
                    return [await call(gw, "Sheddable") for gw in gateways] == [503, 503]

                # each gateway sees the other's 6 within one publish interval; 6 alone is below 10
                await until(shed_on_both, 5, "Sheddable shed on both gateways at 12 in flight in all")
                for gw in gateways:
                    assert await call(gw, "Standard") == 200  # Standard's threshold is the pool

                async def view_gauges(gw) -> dict[str, float]:
                    text = (await client.get(gw.url + "/metrics")).text
                    return {name: float(value) for name, value in
                            (line.split() for line in text.splitlines() if line.startswith("atlas_gateway_shed_view"))}

                for gw in gateways:  # each shows the other's 6 (it may have read a 5 mid-hold a moment ago)
                    async def shows_the_other(gw=gw) -> bool:
                        return await view_gauges(gw) == {"atlas_gateway_shed_view_other_inflight_requests": 6.0,
                                                         "atlas_gateway_shed_view_peers": 1.0}
                    await until(shows_the_other, 5, "the view gauges")
            finally:
                for task in holders:
                    task.cancel()
                await asyncio.gather(*holders, return_exceptions=True)
            # released: the published counts go back to 0, and Sheddable passes again
            await until(lambda: all_published(0), 10, "the counts to drop back to 0")

            async def passes_on_both() -> bool:
                return [await call(gw, "Sheddable") for gw in gateways] == [200, 200]

            await until(passes_on_both, 5, "Sheddable to pass again")

    try:
        asyncio.run(scenario())
    finally:
        r.close()


def test_a_stopped_gateway_leaves_the_view(redis_url, mock_upstream, start_gateway):
    env = dict(ATLAS_SHED_THRESHOLD=str(THRESHOLD), ATLAS_SHED_PUBLISH_SECONDS="0.1")
    first, second = (start_gateway(redis_url, mock_upstream.url, **env) for _ in range(2))
    r = redis.Redis.from_url(redis_url)
    try:
        deadline = time.monotonic() + 10
        while len(published(r)) != 2:
            assert time.monotonic() < deadline, published(r)
            time.sleep(0.02)
        first.stop()  # SIGTERM: it removes its entry on the way out
        deadline = time.monotonic() + 5
        while len(published(r)) != 1:
            assert time.monotonic() < deadline, published(r)
            time.sleep(0.02)
    finally:
        r.close()
