"""Budget exactness: 200 concurrent requests against a key whose daily budget fits exactly 20.

The mock upstream reports usage equal to the reservation (so settling refunds nothing) and
waits 100 ms (so all 200 truly overlap). Passes when at most 20 are admitted, the tokens
settled do not exceed the budget and no concurrency lease is left.

Run as ``python -m benchmarks.exactness GATEWAY_URL REDIS_URL`` with the gateway's checkout
first on PYTHONPATH (its contract and its prompt bound); prints one JSON object.
"""

from __future__ import annotations

import asyncio
import json
import sys
from datetime import datetime, timezone

from .keys import EXACT_KEY, NAMESPACE, redis_client, write_key

CONCURRENT = 200
FITS = 20


async def _fire(url: str, body: dict, headers: dict[str, str]) -> list[int]:
    import aiohttp

    statuses: list[int] = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

        async def one() -> None:
            async with session.post(url + "/v1/chat/completions", json=body, headers=headers) as resp:
                await resp.read()
                statuses.append(resp.status)

        await asyncio.gather(*(one() for _ in range(CONCURRENT)))
    return statuses


def chat_bound(body: dict):
    """The bound the gateway on PYTHONPATH computes for a chat ``body`` with its default settings.
    That gateway may be an older checkout (``BENCH_GATEWAY_SRC``): before the route table (issue
    25) a route was named by a string and the meter lived in ``atlas_gateway.metering.bounds``."""
    from atlas_gateway.settings import Settings

    settings = Settings(upstream_url="http://unused")
    try:
        from atlas_gateway.metering.bounds import Meter
        from atlas_gateway.routes import route
    except ImportError:
        from atlas_gateway.metering.bounds import Meter

        return Meter.from_settings(settings).bound("chat", body)
    return Meter.from_settings(settings).bound(route("chat"), body)


def run(gateway_url: str, redis_url: str) -> dict:
    from atlas_core import contract

    body = {
        "model": "llama-3.1-8b-instruct",
        "messages": [{"role": "user", "content": "Count to ten."}],
        "max_tokens": 100,
    }
    bound = chat_bound(body)
    budget = FITS * bound.reserve
    subject = contract.key_subject(NAMESPACE, "exact")
    day_key, month_key = contract.usage_keys(subject, datetime.now(timezone.utc))
    r = redis_client(redis_url)
    try:
        # a Redis given with BENCH_REDIS_URL may hold an earlier run's counters: start from none
        for counter in (day_key, month_key, contract.lease_key(subject)):
            r.delete(counter)
        write_key(r, contract, EXACT_KEY, "exact", contract.Limits(tokens_per_day=budget))
        headers = {
            "Authorization": f"Bearer {EXACT_KEY}",
            "x-mock-latency-ms": "100",
            "x-mock-prompt-tokens": str(bound.prompt),
            "x-mock-completion-tokens": str(bound.reserve - bound.prompt),
        }
        statuses = asyncio.run(_fire(gateway_url, body, headers))
        settled = int(r.hget(day_key, "settled") or 0)
        leases = r.zcard(contract.lease_key(subject))
    finally:
        r.close()
    admitted, rejected = statuses.count(200), statuses.count(429)
    return {
        "admitted": admitted,
        "rejected_429": rejected,
        "other": len(statuses) - admitted - rejected,
        "reserve_per_request": bound.reserve,
        "budget": budget,
        "tokens_settled": settled,
        "leases_left": leases,
        "ok": settled <= budget and admitted <= FITS and leases == 0,
    }


def summary(res: dict) -> str:
    return (
        f"{res['admitted']} admitted, {res['rejected_429']} x 429, {res['other']} other; tokens settled "
        f"{res['tokens_settled']} of budget {res['budget']} ({res['reserve_per_request']} per request); "
        f"leases left {res['leases_left']} -> {'PASS' if res['ok'] else 'FAIL: BUDGET EXCEEDED'}"
    )


if __name__ == "__main__":
    print(json.dumps(run(sys.argv[1], sys.argv[2])))
