"""What one request costs Redis: the commands it runs (``INFO commandstats``, the scripts' own
``redis.call``s included) and redis-server's CPU per request (/proc, and Redis's own
``used_cpu_*``), with the bench key (every limit kind on the key and its quota).

``python -m benchmarks.redis_work`` (N requests, 3,000; C concurrency, 16; UPSTREAM=mock for
the project's mock instead of nginx). Prints a Markdown table, one row per command.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import tempfile

import redis

from atlas_devstack.redis_server import RedisServer

from . import nginx, tools
from .gateways import HERE_ROOT, GatewaySource
from .instructions import _send
from .keys import BENCH_KEY
from .procs import cpu_seconds
from .runs import CHAT


def _stats(client: redis.Redis) -> tuple[dict[str, tuple[int, float]], float]:
    """{command: (calls, usec)}, and Redis's used CPU seconds (user + system, main thread)."""
    info = client.info("commandstats")
    cpu = client.info("cpu")
    return (
        {k.removeprefix("cmdstat_"): (v["calls"], v["usec"]) for k, v in info.items()},
        cpu["used_cpu_user"] + cpu["used_cpu_sys"],
    )


def main() -> int:
    n, c = int(os.environ.get("N", "3000")), int(os.environ.get("C", "16"))
    workdir = tempfile.mkdtemp(prefix="atlas-redis-work-")
    with contextlib.ExitStack() as stack:
        if os.environ.get("UPSTREAM") == "mock":
            from atlas_devstack.mock_upstream import MockUpstreamProcess

            upstream = stack.enter_context(MockUpstreamProcess()).url
        else:
            upstream = (
                stack.enter_context(nginx.static_upstream(tools.debian_only().nginx, workdir)).url + nginx.JSON_BASE
            )
        rs = stack.enter_context(RedisServer())
        src = GatewaySource("this checkout", HERE_ROOT)
        redis_pid = src.write_bench_key(rs.url)
        gw = stack.enter_context(src.start(rs.url, upstream, workdir))
        url, headers = gw.url + CHAT, {"Authorization": f"Bearer {BENCH_KEY}"}
        asyncio.run(_send(url, 300, c, headers))  # warm: config cache, script cache, connections
        client = redis.Redis.from_url(rs.url)
        before, redis_cpu0 = _stats(client)
        proc0 = cpu_seconds(redis_pid) if redis_pid else None
        asyncio.run(_send(url, n, c, headers))
        after, redis_cpu1 = _stats(client)
        proc1 = cpu_seconds(redis_pid) if redis_pid else None
    print(f"{n} requests at concurrency {c}, the bench key (every limit kind); load average {os.getloadavg()}")
    print("| command | calls per request | µs inside Redis per request (its own timing) |")
    print("|---|---:|---:|")
    total_calls = total_us = 0.0
    for cmd in sorted(after, key=lambda k: -(after[k][0] - before.get(k, (0, 0))[0])):
        calls = after[cmd][0] - before.get(cmd, (0, 0))[0] - (1 if cmd == "info" else 0)
        usec = after[cmd][1] - before.get(cmd, (0, 0))[1]
        if calls <= 0 or cmd == "info":
            continue
        total_calls += calls
        total_us += usec
        print(f"| {cmd} | {calls / n:.2f} | {usec / n:.1f} |")
    print(f"| all | {total_calls / n:.2f} | {total_us / n:.1f} |")
    print(
        f"redis-server CPU per request: {(redis_cpu1 - redis_cpu0) / n * 1e6:.1f} µs (INFO cpu)"
        + (f", {(proc1 - proc0) / n * 1e6:.1f} µs (/proc)" if proc0 is not None else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
