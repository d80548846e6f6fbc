"""Shedding against a cluster-wide threshold: two gateway processes on one real Redis, each
publishing its in-flight count (inflight.lua). ``ATLAS_SHED_THRESHOLD=10`` is a total: with 4
requests held in flight on each gateway a Sheddable request still passes on both, with 6 on
each (12 in all, but only 6 per process) it is shed on both, while Standard requests pass. A
per-process count would have let each gateway reach 10 (20 in all) first.
"""

from __future__ import annotations

import asyncio

import httpx
import redis

from atlas_core import contract
from atlas_devstack.waiting import wait_for, wait_for_async
from tests.fixtures.gateway import write_key

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
                resp = await client.post(
                    gw.url + "/v1/chat/completions",
                    json=body,
                    headers={
                        "Authorization": f"Bearer {KEY}",
                        "x-atlas-priority": priority,
                        "x-mock-latency-ms": str(latency_ms),
                    },
                )
                return resp.status_code

            holders: list[asyncio.Task] = []

            def hold(per_gateway: int) -> None:
                for gw in gateways:
                    holders.extend(asyncio.ensure_future(call(gw, latency_ms=60_000)) for _ in range(per_gateway))

            def all_published(each: int) -> bool:
                counts = published(r)
                return len(counts) == 2 and all(n == each for n in counts.values())

            try:
                await wait_for_async("both gateways to publish", lambda: len(published(r)) == 2, 10)
                hold(4)
                await wait_for_async("4 in flight published by each gateway", lambda: all_published(4), 10)
                for gw in gateways:
                    assert await call(gw, "Sheddable") == 200  # 4 + 4 + the probe < 10

                hold(2)
                await wait_for_async("6 in flight published by each gateway", lambda: all_published(6), 10)

                async def shed_on_both() -> bool:
                    return [await call(gw, "Sheddable") for gw in gateways] == [503, 503]

                # each gateway sees the other's 6 within one publish interval; 6 alone is below 10
                await wait_for_async("Sheddable shed on both gateways at 12 in flight in all", shed_on_both, 5)
                for gw in gateways:
                    assert await call(gw, "Standard") == 200  # Standard's threshold is the pool

                async def view_gauges(gw) -> dict[str, float]:
                    text = (await client.get(gw.url + "/metrics")).text
                    return {
                        name: float(value)
                        for name, value in (
                            line.split() for line in text.splitlines() if line.startswith("atlas_gateway_shed_view")
                        )
                    }

                for gw in gateways:  # each shows the other's 6 (it may have read a 5 mid-hold a moment ago)

                    async def shows_the_other(gw=gw) -> bool:
                        return await view_gauges(gw) == {
                            "atlas_gateway_shed_view_other_inflight_requests": 6.0,
                            "atlas_gateway_shed_view_peers": 1.0,
                        }

                    await wait_for_async("the view gauges", shows_the_other, 5)
            finally:
                for task in holders:
                    task.cancel()
                await asyncio.gather(*holders, return_exceptions=True)
            # released: the published counts go back to 0, and Sheddable passes again
            await wait_for_async("the counts to drop back to 0", lambda: all_published(0), 10)

            async def passes_on_both() -> bool:
                return [await call(gw, "Sheddable") for gw in gateways] == [200, 200]

            await wait_for_async("Sheddable to pass again", passes_on_both, 5)

    try:
        asyncio.run(scenario())
    finally:
        r.close()


def test_a_stopped_gateway_leaves_the_view(redis_url, mock_upstream, start_gateway):
    env = dict(ATLAS_SHED_THRESHOLD=str(THRESHOLD), ATLAS_SHED_PUBLISH_SECONDS="0.1")
    first, second = (start_gateway(redis_url, mock_upstream.url, **env) for _ in range(2))
    r = redis.Redis.from_url(redis_url)
    try:

        def view(message: str) -> AssertionError:
            return AssertionError(f"{message}: {published(r)}")

        wait_for("both processes in the view", lambda: len(published(r)) == 2, 10, error=view)
        first.stop()  # SIGTERM: it removes its entry on the way out
        wait_for("the stopped process out of the view", lambda: len(published(r)) == 1, 5, error=view)
    finally:
        r.close()
