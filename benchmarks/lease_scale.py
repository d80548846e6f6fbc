"""Redis CPU per admission (and settlement) vs requests in flight on the same AtlasQuota.

With N requests of another key of the quota in flight (N leases on the quota), what one
admission and one settlement of a key of that quota cost redis-server: its own accounting,
``INFO commandstats`` (``usec_per_call`` of EVALSHA: the script's run time, without I/O), and
the process's CPU time from /proc (I/O and event loop included) divided by the calls. The
bench key has every limit kind on the key and its quota, cost budgets included, so every
reservation is summed.

``python -m benchmarks.lease_scale`` (an own redis-server; ``LEASES_IN_FLIGHT``, default
"0,2000,20000"; ``LEASES_CALLS``, default 500, per round of 5: the least of the rounds) prints the table; ``make bench`` puts it in
docs/benchmarks.md. Run with another checkout's gateway on ``PYTHONPATH`` (its ``gateway`` and
``core`` folders) for a before/after: it uses only the ledger's public calls.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass

import redis

from atlas_core import contract
from atlas_devstack.redis_server import RedisServer
from atlas_gateway.auth.principal import Principal
from atlas_gateway.ledger.admission import Admission
from atlas_gateway.store.fastredis import FastRedis

BATCH = int(os.environ.get("LEASES_BATCH", "500"))  # calls gathered at once: pipelined, as under load
BIG = 10**12  # limits no bench request reaches: every check runs, none refuses

KEY_LIMITS = contract.Limits(
    requests_per_second=BIG,
    burst=BIG,
    tokens_per_minute=BIG,
    tokens_per_day=BIG,
    tokens_per_month=BIG,
    max_concurrent=BIG,
    cost_per_day=BIG,
    cost_per_month=BIG,
)
QUOTA_LIMITS = KEY_LIMITS


def principal(name: str, quota: str = "shared") -> Principal:
    return Principal(
        contract.KeyConfig("bench", name, "0123abcd", KEY_LIMITS, quota=quota),
        contract.QuotaConfig("bench", quota, QUOTA_LIMITS),
    )


@dataclass
class Point:
    in_flight: int
    admit_us: float  # INFO commandstats usec_per_call of EVALSHA, admissions
    settle_us: float
    admit_cpu_us: float  # redis-server process CPU (/proc) per admission
    settle_cpu_us: float


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _evalsha_usec(client: redis.Redis) -> tuple[int, int]:
    stats = client.info("commandstats").get("cmdstat_evalsha", {})
    return int(stats.get("calls", 0)), int(stats.get("usec", 0))


async def _in_batches(calls) -> list:
    out = []
    calls = list(calls)
    for i in range(0, len(calls), BATCH):
        out += await asyncio.gather(*calls[i : i + BATCH])
    return out


def fill(client: redis.Redis, other: Principal, in_flight: int) -> None:
    """``in_flight`` leases of the key ``other`` (on it and on its quota), written as admit.lua
    writes them, without the running totals (those of a gateway of any version: the scripts
    count leases they have no totals for once). Admitting them one by one would take minutes
    with a ledger whose admissions sum every lease."""
    expiry = int(time.time() * 1000) + 3_600_000
    pipe = client.pipeline(transaction=False)
    for subject in other.subjects:
        lease = contract.lease_key(subject, other.tag)
        tokens = contract.lease_tokens_key(subject, other.tag)
        cost = contract.lease_cost_key(subject, other.tag)
        for start in range(0, in_flight, 1000):
            ids = [f"o{i}" for i in range(start, min(in_flight, start + 1000))]
            pipe.zadd(lease, {rid: expiry for rid in ids})
            pipe.hset(tokens, mapping={rid: 100 for rid in ids})
            pipe.hset(cost, mapping={rid: 1200 for rid in ids})
    pipe.execute()


async def _round(
    admission: Admission, app: Principal, in_flight: int, calls: int, tag: str, sync: redis.Redis, pid: int | None
) -> Point:
    """``calls`` admissions of ``app``, then their settlements, each timed by Redis' accounting."""
    costs = (b"1200", b"1200")

    def window() -> tuple[float, tuple[int, int]]:
        return (_cpu_seconds(pid) if pid else 0.0), _evalsha_usec(sync)

    cpu0, (n0, u0) = window()
    decisions = await _in_batches(admission.admit(app, f"{tag}-{i}", 100, costs=costs) for i in range(calls))
    cpu1, (n1, u1) = window()
    assert all(d.admitted for d in decisions), "the bench's limits refused an admission"
    await _in_batches(admission.settle(app, f"{tag}-{i}", 100, 60, costs=costs) for i in range(calls))
    cpu2, (n2, u2) = window()
    return Point(
        in_flight,
        (u1 - u0) / (n1 - n0),
        (u2 - u1) / (n2 - n1),
        (cpu1 - cpu0) * 1e6 / calls,
        (cpu2 - cpu1) * 1e6 / calls,
    )


async def measure(url: str, pid: int | None, counts: list[int], calls: int, rounds: int = 5) -> list[Point]:
    """One quota per count, all in one Redis, measured in turn round after round (the machine's
    other load then weighs on every count alike); per count the least of the rounds."""
    sync = redis.Redis.from_url(url)
    sync.flushall()
    fast = FastRedis(url, timeout=60.0)  # a before-run at 20,000 takes ms per call
    admission = Admission(lease_ttl_seconds=3600, fast=fast)
    apps = {n: principal("app", f"shared-{n}") for n in counts}
    try:
        for n in counts:
            fill(sync, principal("other", f"shared-{n}"), n)
            # one admission first: a script that finds leases it has no totals for counts them once
            assert (await admission.admit(apps[n], "warm-up", 100, costs=(b"1", b"1"))).admitted
            await admission.settle(apps[n], "warm-up", 100, 100, costs=(b"1", b"1"))
        best: dict[int, Point] = {}
        for r in range(rounds):
            for n in counts:
                p = await _round(admission, apps[n], n, calls, f"r{r}", sync, pid)
                b = best.get(n, p)
                best[n] = Point(
                    n,
                    min(p.admit_us, b.admit_us),
                    min(p.settle_us, b.settle_us),
                    min(p.admit_cpu_us, b.admit_cpu_us),
                    min(p.settle_cpu_us, b.settle_cpu_us),
                )
        return [best[n] for n in counts]
    finally:
        await fast.aclose()
        sync.close()


def table(points: list[Point]) -> str:
    base = points[0]
    rows = [
        "| requests in flight on the quota | admission: EVALSHA µs/call (× at 0) | settlement: µs/call "
        "| redis-server CPU per admission / settlement (/proc) |",
        "|---|---|---|---|",
    ]
    for p in points:
        rows.append(
            f"| {p.in_flight:,} | {p.admit_us:.1f} ({p.admit_us / base.admit_us:.2f}×) | {p.settle_us:.1f} "
            f"| {p.admit_cpu_us:.0f} µs / {p.settle_cpu_us:.0f} µs |"
        )
    return "\n".join(rows)


GOAL = 1.2  # issue 19: the admission at 20,000 in flight costs at most this multiple of at 0


def run() -> list[Point]:
    counts = [int(x) for x in os.environ.get("LEASES_IN_FLIGHT", "0,2000,20000").split(",")]
    calls = int(os.environ.get("LEASES_CALLS", "500"))
    server = RedisServer()
    server.start()
    try:
        return asyncio.run(measure(server.url, server.pid, counts, calls))
    finally:
        server.cleanup()


def report(points: list[Point]) -> str:
    """The docs' section: the table and the goal, met or missed."""
    first, last = points[0], points[-1]
    ratio = last.admit_us / first.admit_us
    verdict = "met" if ratio <= GOAL else "**missed**"
    return (
        f"Redis CPU per admission vs requests in flight (benchmarks/lease_scale.py: leases of another key "
        f"on the same AtlasQuota, every limit kind on; the least of 5 interleaved rounds):\n\n{table(points)}\n\n"
        f"Goal: admission at {last.in_flight:,} in flight ≤ {GOAL}× at {first.in_flight:,}: "
        f"{ratio:.2f}×, {verdict}."
    )


def main() -> None:
    print(report(run()))


if __name__ == "__main__":
    main()
