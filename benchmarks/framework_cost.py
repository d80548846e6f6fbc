"""What a web framework costs the gateway (issue 25: FastAPI serves something or goes).

``python -m benchmarks.framework_cost BASE_DIR [NEW_DIR]`` (directories as for benchmarks.ab):

* **per process**, BASE and NEW alternating over ROUNDS (5) fresh starts against one Redis and
  one mock: the time from exec to the first ``/healthz`` answer, the CPU that start-up took,
  and the resident memory once started and after 2,000 chat completions;
* **per request** of an endpoint off the hot path (in process, no sockets): a ``/v1/usage``-like
  JSON answer from a raw ASGI endpoint (the gateway's way) and from a FastAPI route with a
  response model, the way FastAPI would serve those endpoints with their OpenAPI schema.

Prints medians; the machine may be shared, so the processes alternate and each figure is CPU
time or memory, not wall time, except the start-up time.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from atlas_devstack.mock_upstream import MockUpstreamProcess
from atlas_devstack.redis_server import RedisServer

from .gateways import HERE_ROOT, GatewaySource
from .keys import BENCH_KEY
from .procs import cpu_seconds, rss_kb

WARM_REQUESTS = 2000


def _source(name: str, path: str) -> GatewaySource:
    root = Path(path).resolve()
    if (root / "atlas_gateway").is_dir():
        root = root.parent
    return GatewaySource(name, root)


async def _chat(url: str, n: int) -> None:
    import aiohttp

    body = {"model": "llama-3.1-8b-instruct", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 16}
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {BENCH_KEY}"}) as session:
        for _ in range(n):
            async with session.post(url + "/v1/chat/completions", json=body) as resp:
                await resp.read()
                assert resp.status == 200, resp.status


def one_start(src: GatewaySource, redis_url: str, upstream_url: str, workdir: str) -> dict:
    began = time.monotonic()
    with src.start(redis_url, upstream_url, workdir) as gw:
        ready = time.monotonic() - began
        started = {"start_s": ready, "start_cpu_s": cpu_seconds(gw.pid), "rss_started_mb": rss_kb(gw.pid) / 1024}
        asyncio.run(_chat(gw.url, WARM_REQUESTS))
        started["rss_warm_mb"] = rss_kb(gw.pid) / 1024
    return started


def processes(sources: dict[str, GatewaySource], rounds: int) -> dict[str, dict[str, float]]:
    workdir = tempfile.mkdtemp(prefix="atlas-framework-")
    rows: dict[str, list[dict]] = {name: [] for name in sources}
    with RedisServer() as rs, MockUpstreamProcess() as mock:
        for src in sources.values():
            src.write_bench_key(rs.url)
        for i in range(rounds):
            for name in list(sources) if i % 2 == 0 else list(sources)[::-1]:
                rows[name].append(one_start(sources[name], rs.url, mock.url, workdir))
                print(f"round {i} {name}: {rows[name][-1]}", flush=True)
    return {name: {k: statistics.median(r[k] for r in runs) for k in runs[0]} for name, runs in rows.items()}


# ---------------------------------------------------------------- per request, in process

USAGE = {
    "key": {"namespace": "bench", "name": "k", "keyId": "0123abcd"},
    "usage": {"tokensToday": 1234, "tokensThisMonth": 56789, "requestsToday": 42},
    "limits": {"tokensPerDay": 200000},
    "remaining": {"tokensToday": 198766, "tokensThisMonth": None},
    "quota": None,
}


def _raw_app():
    from atlas_gateway.http.asgi import send_json

    async def app(scope, receive, send):
        await send_json(send, 200, USAGE, [(b"x-request-id", b"1")])

    return app


def _fastapi_app():
    from fastapi import FastAPI
    from pydantic import BaseModel

    class Usage(BaseModel):
        key: dict
        usage: dict
        limits: dict
        remaining: dict
        quota: dict | None

    app = FastAPI()

    @app.get("/v1/usage", response_model=Usage)
    async def usage() -> dict:
        return USAGE

    return app


async def _drive(app, n: int) -> float:
    """CPU microseconds per request of ``n`` GETs of /v1/usage, driven directly over ASGI."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": "/v1/usage",
        "raw_path": b"/v1/usage",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"gw")],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 2),
    }

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        pass

    for _ in range(200):  # warm-up
        await app(dict(scope), receive, send)
    began = time.process_time()
    for _ in range(n):
        await app(dict(scope), receive, send)
    return (time.process_time() - began) / n * 1e6


def per_request(n: int = 20_000, rounds: int = 5) -> dict[str, float]:
    apps = {"raw ASGI": _raw_app(), "FastAPI route with a response model": _fastapi_app()}
    out: dict[str, list[float]] = {name: [] for name in apps}
    for _ in range(rounds):
        for name, app in apps.items():
            out[name].append(asyncio.run(_drive(app, n)))
    return {name: statistics.median(v) for name, v in out.items()}


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    rounds = int(os.environ.get("ROUNDS", "5"))
    sources = {"base": _source("base", argv[0]), "new": _source("new", argv[1] if len(argv) > 1 else str(HERE_ROOT))}
    print(f"load average {os.getloadavg()[0]:.2f}")
    for name, med in processes(sources, rounds).items():
        print(
            f"{name}: start {med['start_s']:.2f} s (CPU {med['start_cpu_s']:.2f} s), RSS started "
            f"{med['rss_started_mb']:.1f} MB, after {WARM_REQUESTS} requests {med['rss_warm_mb']:.1f} MB"
        )
    for name, us in per_request().items():
        print(f"GET /v1/usage-like answer, {name}: {us:.1f} us CPU per request")
    print(f"load average {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
