"""What tracing costs the gateway: CPU per request with tracing off, sampling 1 % and 100 %
(docs/tracing.md), paired in one session.

Three gateway processes of this checkout run side by side against one Redis and one upstream,
the same except for the OTEL_* variables: off (none set), 1 % (parentbased_traceidratio 0.01) and
100 % (parentbased_always_on), both exporting over OTLP/HTTP to a real Jaeger (the export's
encoding runs in the gateway process and is part of the cost). Each round runs wrk against all
three in a rotated order; the medians of the gateway's CPU per request are compared to off.
Requests carry no traceparent (the gateway's own sampler decides).

``python -m benchmarks.tracing_cost`` (ROUNDS=6, DUR=4 s per run, C=16); `make bench` runs it as
one of its steps (BENCH_SKIP_TRACING=1 leaves it out).
"""

from __future__ import annotations

import contextlib
import os
import statistics
import sys
import tempfile
from dataclasses import dataclass

from atlas_devstack.jaeger import Jaeger
from atlas_devstack.mock_upstream import MockUpstreamProcess
from atlas_devstack.redis_server import RedisServer

from . import tools
from .gateways import HERE_ROOT, GatewaySource
from .runs import Bench, gateway_target

VARIANTS = {
    "off": {},
    "1 %": {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.01"},
    "100 %": {"OTEL_TRACES_SAMPLER": "parentbased_always_on"},
}


@dataclass
class Row:
    variant: str
    cpu_us: float  # median gateway CPU per request
    rps: float  # median requests per second
    rounds: list[float]  # gateway CPU per request, per round

    def ratio(self, off: "Row") -> float:
        return self.cpu_us / off.cpu_us if off.cpu_us else float("nan")


def measure(
    bench: Bench,
    redis_url: str,
    redis_pid: int | None,
    upstream_url: str,
    jaeger: Jaeger,
    workdir: str,
    rounds: int,
    connections: int,
    stack: contextlib.ExitStack,
    log=print,
) -> list[Row]:
    src = GatewaySource("tracing", HERE_ROOT)
    targets = {}
    for name, env in VARIANTS.items():
        extra = dict(env)
        if env:
            extra["OTEL_EXPORTER_OTLP_ENDPOINT"] = jaeger.otlp_http_url
        gw = stack.enter_context(src.start(redis_url, upstream_url, workdir, **extra))
        targets[name] = gateway_target(f"tracing {name}", gw, redis_pid)
    cpu: dict[str, list[float]] = {name: [] for name in VARIANTS}
    rps: dict[str, list[float]] = {name: [] for name in VARIANTS}
    names = list(VARIANTS)
    for i in range(rounds):
        order = names[i % len(names) :] + names[: i % len(names)]
        for name in order:
            out = bench.closed(targets[name], connections)
            if out.errors:
                raise RuntimeError(f"tracing {name}: {out.errors} errors in a run")
            cpu[name].append(out.cpu_us["gateway"])
            rps[name].append(out.rps)
            log(
                f"round {i} tracing {name:5}: {out.rps:.0f} req/s, gateway {out.cpu_us['gateway']:.0f} us/req",
                flush=True,
            )
    return [Row(name, statistics.median(cpu[name]), statistics.median(rps[name]), cpu[name]) for name in names]


def table(rows: list[Row], rounds: int, connections: int) -> str:
    off = rows[0]
    lines = [
        f"Tracing (`benchmarks/tracing_cost.py`): gateway CPU per request, median of {rounds} paired rounds "
        f"(wrk c={connections}, rotated order), OTLP/HTTP to a local Jaeger:",
        "",
        "| tracing | gateway CPU per request | vs off | req/s | per round (µs) |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row.variant} | {row.cpu_us:,.0f} µs | {row.ratio(off):.3f}× | {row.rps:,.0f} | "
            f"{', '.join(f'{v:.0f}' for v in row.rounds)} |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    rounds, dur, conc = (int(os.environ.get(n, d)) for n, d in (("ROUNDS", "6"), ("DUR", "4"), ("C", "16")))
    workdir = tempfile.mkdtemp(prefix="atlas-tracing-")
    bench = Bench(tools.ensure(profile=False, litellm=False), workdir, dur, warmup=2)
    with RedisServer() as rs, MockUpstreamProcess() as mock, Jaeger() as jaeger, contextlib.ExitStack() as stack:
        redis_pid = GatewaySource("tracing", HERE_ROOT).write_bench_key(rs.url)
        rows = measure(bench, rs.url, redis_pid, mock.url, jaeger, workdir, rounds, conc, stack)
    print(f"load average {os.getloadavg()[0]:.2f}")
    print(table(rows, rounds, conc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
