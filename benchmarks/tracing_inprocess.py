"""What tracing adds to one gateway process's CPU per request, measured in process and paired
as tightly as a shared machine allows: one gateway app (real Redis, the mock upstream, OTLP/HTTP
to a real Jaeger), requests driven straight into its ASGI callable, and rounds that alternate its
tracer between off, 1 % and 100 % (the same heap, the same connections; only the tracer object
changes). CPU is the process's (the exporter's thread included).

``python -m benchmarks.tracing_inprocess`` (ROUNDS=20, N=300 requests per round and variant).
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
import sys
import time

from atlas_devstack.jaeger import Jaeger
from atlas_devstack.mock_upstream import MockUpstreamProcess
from atlas_devstack.redis_server import RedisServer

from .gateways import HERE_ROOT
from .keys import BENCH_KEY

MODEL = "llama-3.1-8b-instruct"


def variants(config_cls, sdk_tracing) -> dict:
    from atlas_gateway.telemetry.noop import NO_TRACING

    def traced(sampler: str, ratio: float):
        return sdk_tracing(config_cls(trace_exporters=("otlp",), sampler=sampler, sampler_ratio=ratio))

    return {
        "off": NO_TRACING,
        "1 %": traced("parentbased_traceidratio", 0.01),
        "100 %": traced("parentbased_always_on", 1.0),
    }


async def _measure(app, rounds: int, per_round: int) -> dict[str, list[float]]:
    from atlas_gateway.telemetry import TelemetryConfig
    from atlas_gateway.telemetry.otel_sdk import SdkTracing

    body = json.dumps(
        {"model": MODEL, "max_tokens": 16, "messages": [{"role": "user", "content": "hello " * 100}]}
    ).encode()
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v1/chat/completions",
        "query_string": b"",
        "headers": [
            (b"authorization", f"Bearer {BENCH_KEY}".encode()),
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ],
    }

    async def one() -> None:
        status = []
        delivered = []

        async def receive():
            if not delivered:  # the body once; then, as for a client that stays, nothing more
                delivered.append(True)
                return {"type": "http.request", "body": body, "more_body": False}
            await asyncio.Event().wait()

        async def send(message):
            if message["type"] == "http.response.start":
                status.append(message["status"])

        await app(dict(scope), receive, send)
        if status != [200]:
            raise RuntimeError(f"the bench request answered {status}")

    await app.gateway.start()
    rt = app.gateway.runtime
    tracers = variants(TelemetryConfig, SdkTracing)
    cpu: dict[str, list[float]] = {name: [] for name in tracers}
    try:
        for _ in range(300):
            await one()
        names = list(tracers)
        for i in range(rounds):
            for name in names[i % len(names) :] + names[: i % len(names)]:
                rt.tracing = tracers[name]
                started = time.process_time()
                for _ in range(per_round):
                    await one()
                cpu[name].append((time.process_time() - started) / per_round * 1e6)
    finally:
        for tracer in tracers.values():
            tracer.shutdown()
        rt.tracing = tracers["off"]
        await app.gateway.stop()
    return cpu


def main() -> int:
    rounds, per_round = int(os.environ.get("ROUNDS", "20")), int(os.environ.get("N", "300"))
    with RedisServer() as rs, MockUpstreamProcess() as mock, Jaeger() as jaeger:
        subprocess.run(
            [sys.executable, "-m", "benchmarks.keys", rs.url], check=True, capture_output=True, cwd=str(HERE_ROOT)
        )
        os.environ.update(
            {
                "ATLAS_REDIS_URL": rs.url,
                "ATLAS_UPSTREAM_URL": mock.url,
                "ATLAS_LOG_LEVEL": "warning",
                "OTEL_EXPORTER_OTLP_ENDPOINT": jaeger.otlp_http_url,
            }
        )
        import uvloop

        from atlas_gateway.app import create_app
        from atlas_gateway.settings import Settings

        cpu = uvloop.run(_measure(create_app(Settings.from_env()), rounds, per_round))
    off = statistics.median(cpu["off"])
    print(f"load average {os.getloadavg()[0]:.2f}; {rounds} rounds x {per_round} requests per variant, in process:")
    print("| tracing | CPU per request (median) | vs off | median of the paired differences |")
    print("|---|---|---|---|")
    for name, values in cpu.items():
        diffs = [v - o for v, o in zip(values, cpu["off"])]
        print(
            f"| {name} | {statistics.median(values):,.0f} µs | {statistics.median(values) / off:.3f}× | "
            f"{statistics.median(diffs):+,.1f} µs |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
