"""Flat admission on a real redis-server (design.md, "Fleet scale"): what one admission and one
settlement cost Redis does not grow with the requests in flight on the same AtlasQuota. Before
issue 19 admit.lua summed every live lease per call: ×10 at 20,000 in flight (docs/benchmarks.md).

Redis's own accounting (INFO commandstats, EVALSHA usec_per_call; the least of a few rounds,
benchmarks/lease_scale.py) at 0, 2,000 and 20,000 leases of another key on the quota. The bound
is generous (the machine is shared, other load doubles a figure at times): a ledger that scans
its leases costs ×10 at 20,000."""

from __future__ import annotations

import asyncio

import redis

from atlas_core import contract
from benchmarks.lease_scale import measure, principal

FLAT = 3.0  # at most this multiple of the cost at 0 in flight (a scan: ×10 at 20,000; noise: up to ×2)


def test_admission_and_settlement_cost_redis_the_same_at_0_2000_and_20000_in_flight(redis_server, redis_url):
    points = asyncio.run(measure(redis_url, redis_server.pid, [0, 2_000, 20_000], calls=200))
    base = points[0]
    for p in points[1:]:
        assert p.admit_us <= FLAT * base.admit_us, (p, base)
        assert p.settle_us <= FLAT * base.settle_us + 20, (p, base)

    # and the totals the admissions read are the leases' exactly: 20,000 of "other", none of "app"
    client = redis.Redis.from_url(redis_url)
    try:
        other = principal("other", "shared-20000")
        quota = other.subjects[1]
        totals = client.hgetall(contract.lease_sum_key(quota, other.tag))
        assert (int(totals[b"n"]), int(totals[b"tok"]), int(totals[b"cost"])) == (20_000, 20_000 * 100, 20_000 * 1200)
        assert not client.exists(contract.lease_sum_key(principal("app", "shared-20000").subjects[0], other.tag))
    finally:
        client.close()
