"""The floor: what a forward costs on each candidate server and upstream client, beside nginx as
a reverse proxy and Atlas itself, all in front of the same static nginx (issue 24).

``python -m benchmarks.floor``: every candidate runs at once (idle ones cost nothing); each
round loads each in turn (order reversed every other round) with wrk at c=16, counting the CPU
its processes spent per request (/proc), then at c=1 for the added p50 over nginx directly.
Prints per-round figures and the medians as a Markdown table (docs/benchmarks.md quotes it).

Environment: ROUNDS (3), DUR (s per run, 4), CANDIDATES (comma-separated ``server/client`` pairs
of benchmarks.bare_forward; default: all that are installed: granian and socketify come with
``pip install -e '.[floor]'``), GATEWAY_SRC (comma-separated
checkouts whose Atlas gateway is measured too, as in ``make bench``: e.g. a "before"),
SKIP_SELF=1 (not this checkout's gateway), UPSTREAM=mock (the project's mock upstream instead of
the static nginx, and no nginx proxy: where nginx is not installed; the mock's own speed then
bounds the throughput, so CPU per request compares candidates with each other only).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import statistics
import sys
import tempfile

from atlas_devstack.redis_server import RedisServer

from . import bodies, nginx, tools
from .gateways import sources
from .procs import Proc
from .runs import CHAT, Bench, Target, gateway_target

DEFAULT = [
    "atlas/aiohttp",
    "uvicorn/aiohttp",
    "atlas/httpx",
    "atlas/raw",
    "granian-asgi/aiohttp",
    "granian-rsgi/aiohttp",
    "granian-rsgi/raw",
    "socketify/aiohttp",
    "socketify-asgi/aiohttp",
]
NGINX_PROXY = "nginx as a reverse proxy"


def _installed(candidate: str) -> bool:
    server, client = candidate.split("/")
    need = {"granian": "granian", "socketify": "socketify", "httpx": "httpx"}
    return all(importlib.util.find_spec(mod) is not None for key, mod in need.items() if key in (server, client))


def label(candidate: str) -> str:
    server, client = candidate.split("/")
    names = {
        "atlas": "Atlas's server (uvicorn + uvloop + httptools)",
        "uvicorn": "stock uvicorn httptools",
        "granian-asgi": "granian ASGI",
        "granian-rsgi": "granian RSGI",
        "socketify": "socketify native",
        "socketify-asgi": "socketify ASGI",
    }
    return f"bare forward: {names[server]} + {client}"


def bare_forward_command(server: str, client: str, upstream: str, port: str) -> list[str]:
    """The bare forward's process: ``server`` and ``client`` name a candidate (benchmarks.bare_forward)."""
    return [
        sys.executable,
        "-m",
        "benchmarks.bare_forward",
        "--server",
        server,
        "--client",
        client,
        "--upstream",
        upstream,
        "--port",
        port,
    ]


def bare_forward(candidate: str, upstream: str, workdir: str) -> Proc:
    server, client = candidate.split("/")
    return Proc(
        label(candidate),
        bare_forward_command(server, client, upstream, "{port}"),
        log=os.path.join(workdir, f"bare-{server}-{client}.log"),
    )


def main() -> int:
    rounds, duration = int(os.environ.get("ROUNDS", "3")), float(os.environ.get("DUR", "4"))
    candidates = [c for c in (os.environ.get("CANDIDATES") or ",".join(DEFAULT)).split(",") if c]
    skipped = [c for c in candidates if not _installed(c)]
    candidates = [c for c in candidates if c not in skipped]
    if skipped:
        print(f"not installed, skipped: {', '.join(skipped)}", flush=True)
    mock = os.environ.get("UPSTREAM") == "mock"
    tl = tools.Tools(wrk="wrk", nginx="", vegeta="", litellm=None, py_spy=None) if mock else tools.debian_only()
    workdir = tempfile.mkdtemp(prefix="atlas-floor-")
    bench = Bench(tl, workdir, duration, 1.0)
    body = bodies.encode(bodies.SMALL)
    print(f"load average {os.getloadavg()}; {rounds} rounds x {duration:g} s", flush=True)
    with contextlib.ExitStack() as stack:
        if mock:
            from atlas_devstack.mock_upstream import MockUpstreamProcess

            static = stack.enter_context(MockUpstreamProcess())
            json_base = static.url
            direct = Target("the mock directly", json_base + CHAT, json_base + CHAT, cpu={"mock": static._proc.pid})
            targets = []
        else:
            static = stack.enter_context(nginx.static_upstream(tl.nginx, workdir))
            json_base = static.url + nginx.JSON_BASE
            direct = Target("nginx directly", json_base + CHAT, json_base + CHAT, cpu={"nginx": static.pid})
            proxy = stack.enter_context(nginx.reverse_proxy(tl.nginx, workdir, static.port))
            targets = [Target(NGINX_PROXY, proxy.url + nginx.JSON_BASE + CHAT, "", cpu={"proxy": proxy.pid})]
        for cand in candidates:
            p = stack.enter_context(bare_forward(cand, json_base, workdir))
            targets.append(Target(label(cand), p.url + CHAT, "", cpu={"forward": p.pid}))
        env = {
            **os.environ,
            "BENCH_GATEWAY_SRC": os.environ.get("GATEWAY_SRC", ""),
            "BENCH_SKIP_SELF": os.environ.get("SKIP_SELF", ""),
        }
        for src in sources(env):
            rs = stack.enter_context(RedisServer())
            redis_pid = src.write_bench_key(rs.url)
            gw = stack.enter_context(src.start(rs.url, json_base, workdir))
            targets.append(gateway_target(f"{src.label} (every limit kind)", gw, redis_pid))
        c16: dict[str, list[float]] = {t.label: [] for t in targets}
        redis16: dict[str, list[float]] = {t.label: [] for t in targets}
        p50: dict[str, list[float]] = {t.label: [] for t in targets}
        direct_p50: list[float] = []
        for r in range(rounds):
            direct_p50.append(bench.closed(direct, 1, body).p50)
            for t in targets if r % 2 == 0 else targets[::-1]:
                run = bench.closed(t, 16, body)
                own = next(v for k, v in run.cpu_us.items() if k != "redis-server")
                c16[t.label].append(own)
                if "redis-server" in run.cpu_us:
                    redis16[t.label].append(run.cpu_us["redis-server"])
                one = bench.closed(t, 1, body)
                p50[t.label].append(one.p50)
                print(
                    f"round {r} {t.label}: c=16 {own:.0f} µs/req ({run.rps:,.0f}/s{', ERRORS' if run.errors else ''}), "
                    f"c=1 p50 {one.p50:.3f} ms{', ERRORS' if one.errors else ''}",
                    flush=True,
                )
    ref = statistics.median(direct_p50)
    floor = statistics.median(c16[label("atlas/aiohttp")]) if label("atlas/aiohttp") in c16 else None
    nginx_us = statistics.median(c16[NGINX_PROXY]) if NGINX_PROXY in c16 else None
    print(f"\nload average {os.getloadavg()}; {direct.label} c=1 p50 {ref:.3f} ms (median)\n")
    print(
        "| target | CPU per request c=16 (median of rounds) | × nginx proxy | × Atlas's bare forward | "
        f"c=1 p50 added over {direct.label} |"
    )
    print("|---|---|---|---|---|")
    for t in targets:
        cpu = statistics.median(c16[t.label])
        redis = f" (+{statistics.median(redis16[t.label]):.0f} µs redis-server)" if redis16[t.label] else ""
        vs_floor = f"{cpu / floor:.2f}" if floor else "–"
        vs_nginx = f"{cpu / nginx_us:.2f}" if nginx_us else "–"
        print(
            f"| {t.label} | {cpu:.0f} µs{redis} | {vs_nginx} | {vs_floor} | "
            f"+{statistics.median(p50[t.label]) - ref:.3f} ms |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
