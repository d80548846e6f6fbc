"""Paired comparison of two gateway versions on one machine, in one session.

``python -m benchmarks.ab BASE_DIR [NEW_DIR]``: each DIR is a directory holding an
``atlas_gateway`` package (e.g. ``git archive HEAD gateway/atlas_gateway | tar -x -C /tmp/base``
then ``/tmp/base/gateway``; NEW_DIR defaults to this tree's ``gateway``). Both gateways run side
by side against one Redis and one mock; wrk runs alternate between them (order flipped every
round) with a direct run of the mock per round. Prints per-round and median gateway CPU and
Redis CPU per request and the throughput ratio to direct. On a shared machine single runs
scatter by ±15 %: only this kind of paired comparison tells small changes apart.

Environment: ROUNDS (6), DUR (seconds per run, 4), C (concurrency, 16), MOCK=fastapi for the
FastAPI implementation of the mock (design.md's reference setup).
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
from pathlib import Path

import redis

from atlas_devstack.mock_upstream import MockUpstreamProcess
from atlas_devstack.redis_server import RedisServer

from .__main__ import BENCH_KEY, NEVER_BITING, REDIS_PID, Proc, gateway, measure_gateway, wrk, write_key


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    dirs = {"base": argv[0], "new": argv[1] if len(argv) > 1 else str(Path(__file__).parents[1] / "gateway")}
    rounds, dur, conc = (int(os.environ.get(n, d)) for n, d in (("ROUNDS", "6"), ("DUR", "4"), ("C", "16")))
    workdir = tempfile.mkdtemp(prefix="atlas-ab-")
    mock_ctx = (Proc(["-m", "atlas_devstack.mock_upstream", "--framework", "fastapi", "--port", "{port}"])
                if os.environ.get("MOCK") == "fastapi" else MockUpstreamProcess())
    results: dict[str, list[tuple[float, float, float, float]]] = {v: [] for v in dirs}
    with RedisServer() as rs, mock_ctx as mock:
        REDIS_PID.append(rs._proc.pid)
        client = redis.Redis.from_url(rs.url)
        write_key(client, BENCH_KEY, "bench", NEVER_BITING, NEVER_BITING)
        client.close()
        gateways = {}
        try:
            for name, path in dirs.items():
                gateways[name] = gateway(rs.url, mock.url, PYTHONPATH=path).__enter__()
            for gw in gateways.values():
                wrk(gw.url, conc, 2, BENCH_KEY, workdir)  # warm-up
            for i in range(rounds):
                direct = wrk(mock.url, conc, dur, None, workdir)["rps"]
                for name in (list(dirs) if i % 2 == 0 else list(dirs)[::-1]):
                    out = measure_gateway(gateways[name], conc, dur, workdir, warmup=0)
                    row = (out["rps"], out["cpu_us"], out["redis_us"], out["rps"] / direct if direct else 0.0)
                    results[name].append(row)
                    print(f"round {i} {name:4}: p50 {out['p50']:.3f} ms, {row[0]:.0f} req/s, gateway {row[1]:.0f} us/req, "
                          f"Redis {row[2]:.0f} us/req, ratio {row[3]:.2f} (direct {direct:.0f}), non-2xx {out['errors']}",
                          flush=True)
        finally:
            for gw in gateways.values():
                gw.__exit__(None, None, None)
    print(f"load average {os.getloadavg()[0]:.2f}; medians over {rounds} rounds, c={conc}:")
    for name, rows in results.items():
        med = [statistics.median(r[k] for r in rows) for k in range(4)]
        print(f"{name:4}: {med[0]:.0f} req/s, gateway {med[1]:.0f} us/req, Redis {med[2]:.0f} us/req, ratio {med[3]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
