"""Redis CPU per admission (and settlement) vs requests in flight on the same AtlasQuota.

With N requests of another key of the quota in flight (N leases on the quota), what one
admission and one settlement of a key of that quota cost redis-server: its own accounting,
``INFO commandstats`` (``usec_per_call`` of EVALSHA: the script's run time, without I/O), and
the process's CPU time from /proc (I/O and event loop included) divided by the calls. The
bench key has every limit kind on the key and its quota, cost budgets included, so every
reservation is summed.

``python -m benchmarks.lease_scale`` (an own redis-server; ``LEASES_IN_FLIGHT``, default
"0,2000,20000"; ``LEASES_CALLS``, default 2000) prints the table; ``make bench`` puts it in
docs/benchmarks.md. Run with another checkout's gateway on ``PYTHONPATH`` (its ``gateway`` and
``core`` folders) for a before/after: it uses only the ledger's public calls.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass

import redis

from atlas_core import contract
from atlas_devstack.redis_server import RedisServer
from atlas_gateway.auth.principal import Principal
from atlas_gateway.ledger.admission import Admission
from atlas_gateway.store.fastredis import FastRedis

BATCH = int(os.environ.get("LEASES_BATCH", "500"))  # calls gathered at once: pipelined, as under load
BIG = 10**12  # limits no bench request reaches: every check runs, none refuses

KEY_LIMITS = contract.Limits(requests_per_second=BIG, burst=BIG, tokens_per_minute=BIG, tokens_per_day=BIG,
                             tokens_per_month=BIG, max_concurrent=BIG, cost_per_day=BIG, cost_per_month=BIG)
QUOTA_LIMITS = KEY_LIMITS


def principal(name: str) -> Principal:
    return Principal(contract.KeyConfig("bench", name, "0123abcd", KEY_LIMITS, quota="shared"),
                     contract.QuotaConfig("bench", "shared", QUOTA_LIMITS))


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
        out += await asyncio.gather(*calls[i:i + BATCH])
    return out


async def measure_point(url: str, pid: int | None, in_flight: int, calls: int) -> Point:
    sync = redis.Redis.from_url(url)
    sync.flushall()
    fast = FastRedis(url, timeout=60.0)  # a before-run at 20,000 takes ms per call
    admission = Admission(lease_ttl_seconds=3600, fast=fast)
    other, app = principal("other"), principal("app")
    costs = (b"1200", b"1200")
    try:
        filled = await _in_batches(admission.admit(other, f"o{i}", 100, costs=costs) for i in range(in_flight))
        assert all(d.admitted for d in filled), "the bench's limits refused a filler admission"

        def window() -> tuple[float, tuple[int, int]]:
            return (_cpu_seconds(pid) if pid else 0.0), _evalsha_usec(sync)

        cpu0, (n0, u0) = window()
        decisions = await _in_batches(admission.admit(app, f"a{i}", 100, costs=costs) for i in range(calls))
        cpu1, (n1, u1) = window()
        assert all(d.admitted for d in decisions), "the bench's limits refused an admission"
        await _in_batches(admission.settle(app, f"a{i}", 100, 60, costs=costs) for i in range(calls))
        cpu2, (n2, u2) = window()
        return Point(in_flight, (u1 - u0) / (n1 - n0), (u2 - u1) / (n2 - n1),
                     (cpu1 - cpu0) * 1e6 / calls, (cpu2 - cpu1) * 1e6 / calls)
    finally:
        await fast.aclose()
        sync.close()


async def measure(url: str, pid: int | None, counts: list[int], calls: int) -> list[Point]:
    return [await measure_point(url, pid, n, calls) for n in counts]


def table(points: list[Point]) -> str:
    base = points[0]
    rows = ["| requests in flight on the quota | admission: EVALSHA µs/call (× at 0) | settlement: µs/call "
            "| redis-server CPU per admission / settlement (/proc) |",
            "|---|---|---|---|"]
    for p in points:
        rows.append(f"| {p.in_flight:,} | {p.admit_us:.1f} ({p.admit_us / base.admit_us:.2f}×) | {p.settle_us:.1f} "
                    f"| {p.admit_cpu_us:.0f} µs / {p.settle_cpu_us:.0f} µs |")
    return "\n".join(rows)


def main() -> None:
    counts = [int(x) for x in os.environ.get("LEASES_IN_FLIGHT", "0,2000,20000").split(",")]
    calls = int(os.environ.get("LEASES_CALLS", "2000"))
    server = RedisServer()
    server.start()
    try:
        points = asyncio.run(measure(server.url, server.pid, counts, calls))
    finally:
        server.cleanup()
    print(table(points))


if __name__ == "__main__":
    main()
