"""A/B the gateway's hot path against another checkout: ``python -m benchmarks.ab <tree>``.

Both gateways (this tree's and ``<tree>``'s, e.g. ``git archive <commit> | tar -x -C /tmp/base``)
run side by side on one Redis and one mock upstream, and wrk runs alternate between them
(order flipped every round), so the drift of a shared machine hits both alike. Prints the
median p50, req/s and the gateway's CPU per request (the least load-dependent figure) at
concurrency 1 and 16. ROUNDS (default 6) rounds of 4 s runs.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile

import redis

from atlas_devstack.mock_upstream import MockUpstreamProcess
from atlas_devstack.redis_server import RedisServer

from . import __main__ as bench


def main(argv: list[str]) -> int:
    if len(argv) != 1 or not os.path.isdir(os.path.join(argv[0], "gateway")):
        print("usage: python -m benchmarks.ab <other checkout>", file=sys.stderr)
        return 2
    other = os.path.abspath(argv[0])
    other_path = ":".join(os.path.join(other, d) for d in ("gateway", "core", "devstack"))
    rounds = int(os.environ.get("ROUNDS", "6"))
    with RedisServer() as rs, MockUpstreamProcess() as mock, tempfile.TemporaryDirectory() as work:
        client = redis.Redis.from_url(rs.url)
        bench.write_key(client, bench.BENCH_KEY, "bench", bench.NEVER_BITING, bench.NEVER_BITING)
        client.close()
        with bench.gateway(rs.url, mock.url, PYTHONPATH=other_path) as base, bench.gateway(rs.url, mock.url) as new:
            results: dict[tuple[str, int], list[dict]] = {(n, c): [] for c in (1, 16) for n in ("other", "this")}
            for i in range(rounds):
                for c in (1, 16):
                    order = [("other", base), ("this", new)] if i % 2 == 0 else [("this", new), ("other", base)]
                    for name, gw in order:
                        results[(name, c)].append(bench.measure_gateway(gw, c, 4, work, warmup=1))
            direct = statistics.median(bench.wrk(mock.url, 1, 3, None, work)["p50"] for _ in range(3))
    print(f"upstream direct c=1 p50 median {direct:.3f} ms; {rounds} rounds")
    for (name, c), runs in results.items():
        p50 = statistics.median(r["p50"] for r in runs)
        print(f"{name:5} c={c:<3} p50 {p50:.3f} ms (added {p50 - direct:.3f})  "
              f"req/s {statistics.median(r['rps'] for r in runs):.0f}  "
              f"CPU {statistics.median(r['cpu_us'] for r in runs):.0f} us/req  "
              "(runs: " + ", ".join(f"{r['cpu_us']:.0f}" for r in runs) + ")")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
