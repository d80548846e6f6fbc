"""Paired comparison of two gateway versions on one machine, in one session.

``python -m benchmarks.ab BASE_DIR [NEW_DIR]``: each DIR is a checkout (e.g. ``/work/main``) or
a directory holding an ``atlas_gateway`` package (e.g. ``git archive HEAD gateway/atlas_gateway |
tar -x -C /tmp/base`` then ``/tmp/base/gateway``); NEW_DIR defaults to this checkout. Both gateways run side
by side against one Redis and one mock; wrk runs alternate between them (order flipped every
round) with a direct run of the mock per round. Prints per-round and median gateway CPU and
Redis CPU per request and the throughput ratio to direct. On a shared machine single runs
scatter by ±15 %: only this kind of paired comparison tells small changes apart.

Environment: ROUNDS (6), DUR (seconds per run, 4), C (concurrency, 16), MOCK=fastapi for the
FastAPI implementation of the mock (design.md's reference setup).
"""

from __future__ import annotations

import contextlib
import os
import statistics
import sys
import tempfile
from pathlib import Path

from atlas_devstack.mock_upstream import MockUpstreamProcess
from atlas_devstack.redis_server import RedisServer

from . import tools
from .gateways import HERE_ROOT, GatewaySource
from .procs import Proc
from .runs import Bench, Target, gateway_target


def _source(name: str, path: str) -> GatewaySource:
    root = Path(path).resolve()
    if (root / "atlas_gateway").is_dir():  # a gateway/ folder: its parent is the checkout
        root = root.parent
    return GatewaySource(name, root)


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    dirs = {"base": _source("base", argv[0]), "new": _source("new", argv[1] if len(argv) > 1 else str(HERE_ROOT))}
    rounds, dur, conc = (int(os.environ.get(n, d)) for n, d in (("ROUNDS", "6"), ("DUR", "4"), ("C", "16")))
    workdir = tempfile.mkdtemp(prefix="atlas-ab-")
    bench = Bench(tools.ensure(profile=False, litellm=False), workdir, dur, warmup=2)
    mock_ctx = (
        Proc(
            "fastapi mock",
            [sys.executable, "-m", "atlas_devstack.mock_upstream", "--framework", "fastapi", "--port", "{port}"],
        )
        if os.environ.get("MOCK") == "fastapi"
        else MockUpstreamProcess()
    )
    results: dict[str, list[tuple[float, float, float, float]]] = {v: [] for v in dirs}
    with RedisServer() as rs, mock_ctx as mock, contextlib.ExitStack() as stack:
        direct = Target("mock directly", mock.url + "/v1/chat/completions", mock.url + "/v1/chat/completions")
        targets = {}
        for name, src in dirs.items():
            src.write_bench_key(rs.url)
            targets[name] = gateway_target(name, stack.enter_context(src.start(rs.url, mock.url, workdir)), rs.pid)
        for i in range(rounds):
            direct_rps = bench.closed(direct, conc).rps
            for name in list(dirs) if i % 2 == 0 else list(dirs)[::-1]:
                out = bench.closed(targets[name], conc)
                row = (
                    out.rps,
                    out.cpu_us["gateway"],
                    out.cpu_us["redis-server"],
                    out.rps / direct_rps if direct_rps else 0.0,
                )
                results[name].append(row)
                print(
                    f"round {i} {name:4}: p50 {out.p50:.3f} ms, {row[0]:.0f} req/s, gateway {row[1]:.0f} us/req, "
                    f"Redis {row[2]:.0f} us/req, ratio {row[3]:.2f} (direct {direct_rps:.0f}), errors {out.errors}",
                    flush=True,
                )
    print(f"load average {os.getloadavg()[0]:.2f}; medians over {rounds} rounds, c={conc}:")
    for name, rows in results.items():
        med = [statistics.median(r[k] for r in rows) for k in range(4)]
        print(
            f"{name:4}: {med[0]:.0f} req/s, gateway {med[1]:.0f} us/req, Redis {med[2]:.0f} us/req, ratio {med[3]:.2f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
