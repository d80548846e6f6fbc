"""``make bench`` (= ``python -m benchmarks``): what the gateway costs, side by side with a static
upstream, the project's mock and a peer proxy, in one run on this machine.

Processes, all on 127.0.0.1 and free ports: a static nginx upstream (benchmarks.nginx), the
mock upstream, one redis-server and the gateway per Atlas checkout under test
(benchmarks.gateways: this one, plus any in ``BENCH_GATEWAY_SRC`` for a before/after in the same
run), LiteLLM's proxy forwarding to the same nginx (benchmarks.litellm_peer), and the two floors
every Atlas figure is divided by (skip: BENCH_SKIP_FLOOR=1): nginx as a reverse proxy in front of
the static nginx, and a bare forward with no logic on Atlas's own server and upstream client
(benchmarks.bare_forward; other servers and clients: ``python -m benchmarks.floor``). Then:

1. closed loop (wrk, c=1 and c=16): nginx directly, Atlas → nginx, LiteLLM → nginx, the mock
   directly, Atlas → mock, Atlas with 2 workers; req/s, p50/p99 and CPU per request of the
   gateway and of redis-server (from /proc), and that CPU as a ratio to each floor's;
2. fixed rate (vegeta, open loop) at 500 and 2,000 requests/s, the same targets;
3. 1 KB and 200 KB prompts, streamed and not (wrk c=1): the added p50 over nginx directly;
4. memory per idle keep-alive connection and per open stream (benchmarks.memory);
5. budget exactness (benchmarks.exactness) and 1,000 slow clients (benchmarks.slow_clients);
6. with ``BENCH_PROFILE=1``, py-spy's top functions of each gateway under c=16 load;
7. this checkout's gateway authenticated by a workload identity token vs its static key
   (benchmarks.token_auth: CPU per request in alternating pairs; skip: BENCH_SKIP_TOKEN=1);
8. tracing off, at 1 % and at 100 % (benchmarks.tracing_cost): gateway CPU per request, paired
   (skip: BENCH_SKIP_TRACING=1; rounds: BENCH_TRACING_ROUNDS, 6);
9. Redis CPU per admission vs requests in flight on one AtlasQuota, 0 / 2,000 / 20,000
   (benchmarks.lease_scale, this checkout's scripts; skip: BENCH_SKIP_LEASES=1).
10. long requests held at once (benchmarks.capacity): 1,000, 4,000 and 9,000 (``BENCH_CAPACITY_N``),
    streamed and not, through one gateway process with its defaults to the mock; how many were
    shed, RSS and open files per request held (skip: BENCH_SKIP_CAPACITY=1).

The tables and issue 13's targets (met / missed) are printed and written into
docs/benchmarks.md between its markers. Only budget exactness, and errors or no answers in the
closed-loop or prompt runs of nginx, the mock or Atlas (which would make the figures measure
errors), fail the run.

Environment: BENCH_REDIS_URL (a running Redis or Redis Cluster to use instead of starting one per
gateway; its CPU is that of the master holding the bench key's slot, when local), BENCH_DURATION
(s per load run, 5), BENCH_WARMUP (s, 1), BENCH_RATES ("500,2000"),
BENCH_PROMPT_SIZES (bytes, "1024,204800"), BENCH_GATEWAY_SRC (other checkouts, comma-separated),
BENCH_SKIP_SELF=1 (only those), BENCH_SKIP_LITELLM=1, BENCH_SKIP_MOCK=1, BENCH_SKIP_WORKERS=1,
BENCH_SKIP_MEMORY=1, BENCH_SKIP_SLOW=1, BENCH_SKIP_TOKEN=1, BENCH_SKIP_TRACING=1, BENCH_TRACING_ROUNDS (6),
BENCH_SKIP_CAPACITY=1, BENCH_CAPACITY_N ("1000,4000,9000"), BENCH_CAPACITY_KEYS (200),
BENCH_CLIENTS=1 (add the bare forward with httpx), BENCH_SKIP_FLOOR=1,
BENCH_PROFILE=1, BENCH_WRITE_DOCS=0 (print only), BENCH_NOTE (a sentence put into the docs section,
e.g. what "before" and "after" are). A smoke run:
``BENCH_DURATION=1 BENCH_WARMUP=0 BENCH_SKIP_LITELLM=1 BENCH_SKIP_SLOW=1 BENCH_SKIP_CAPACITY=1 BENCH_WRITE_DOCS=0 make bench``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from atlas_devstack.jaeger import Jaeger
from atlas_devstack.mock_upstream import MockUpstreamProcess
from atlas_devstack.redis_server import RedisServer

from . import (
    bodies,
    capacity,
    exactness,
    floor,
    lease_scale,
    litellm_peer,
    load,
    memory,
    nginx,
    profiling,
    report,
    slow_clients,
    token_auth,
    tools,
    tracing_cost,
)
from .gateways import HERE_ROOT, GatewaySource, sources
from .keys import BENCH_KEY
from .procs import ProcError
from .runs import CHAT, Bench, Target, gateway_target

DOC = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
OVERLOAD_LIMIT = 4  # fixed rates above this multiple of a target's closed-loop capacity are not run


def _env_list(name: str, default: str) -> list[int]:
    return [int(x) for x in os.environ.get(name, default).split(",") if x.strip()]


def _on(name: str) -> bool:
    return os.environ.get(name) == "1"


def _line(label: str, run: load.Run) -> str:
    cpu = ", ".join(f"{k} {v:,.0f} µs/req" for k, v in run.cpu_us.items())
    return (
        f"  {label:52} p50 {report.ms(run.p50):>9}  p99 {report.ms(run.p99):>9}  {run.rps:9,.0f} req/s"
        + (f"  {cpu}" if cpu else "")
        + (f"  ({run.errors} ERRORS)" if run.errors else "")
    )


@dataclass
class Side:
    """One Atlas checkout under test: its Redis and its gateway in front of nginx."""

    src: GatewaySource
    redis_url: str
    redis_pid: int | None  # the redis-server holding the bench key's counters
    target: Target


@dataclass
class Setup:
    """What the sections share: the running upstreams, gateways and peer."""

    bench: Bench
    res: report.Results
    stack: contextlib.ExitStack
    workdir: str
    json_base: str
    sse_base: str
    mock: MockUpstreamProcess | None
    sides: list[Side]
    main_targets: list[Target]  # nginx directly, each Atlas → nginx, LiteLLM → nginx

    def measure_closed(self, target: Target, concurrency: tuple[int, ...] = (1, 16)) -> None:
        for c in concurrency:
            run = self.res.closed.setdefault(target.label, {})[c] = self.bench.closed(target, c)
            print(_line(f"{target.label} c={c}", run), flush=True)


def closed_loop(s: Setup) -> None:
    print("\n1. closed loop (wrk), small chat completion", flush=True)
    for target in s.main_targets:
        s.measure_closed(target)
    if s.mock is not None and not _on("BENCH_SKIP_MOCK"):
        s.measure_closed(Target("mock directly", s.mock.url + CHAT, s.mock.url + CHAT, cpu={"mock": s.mock._proc.pid}))
        for side in s.sides:
            gwm = s.stack.enter_context(side.src.start(side.redis_url, s.mock.url, s.workdir))
            s.measure_closed(gateway_target(f"{side.src.label} → mock", gwm, side.redis_pid))
    if not _on("BENCH_SKIP_WORKERS"):
        for side in s.sides:
            with side.src.start(
                side.redis_url, s.json_base, s.workdir, {bodies.STREAM_MODEL: s.sse_base}, ATLAS_WORKERS="2"
            ) as gw2:
                s.measure_closed(gateway_target(f"{side.src.label}, 2 workers → nginx", gw2, side.redis_pid), (16,))
    if _on("BENCH_CLIENTS"):  # the upstream-client comparison (aiohttp vs httpx) of docs/benchmarks.md
        with floor.bare_forward("atlas/httpx", s.json_base, s.workdir) as proxy:
            s.measure_closed(
                Target(
                    "bare forward on Atlas's server + httpx → nginx",
                    proxy.url + CHAT,
                    proxy.url + CHAT,
                    cpu={"proxy": proxy.pid},
                )
            )


def fixed_rate(s: Setup, rates: list[int]) -> None:
    print("\n2. fixed rate (vegeta, open loop)", flush=True)
    for rate in rates:
        for target in s.main_targets:
            runs = s.res.fixed.setdefault(target.label, {})
            capacity = s.res.closed[target.label][16].rps
            # an overloaded target is a result (latency, shed answers) up to a point; far beyond its
            # capacity a run only measures a queue growing for the whole run
            if rate > OVERLOAD_LIMIT * capacity:
                runs[rate] = f"not run: over {OVERLOAD_LIMIT}× its c=16 capacity ({capacity:,.0f}/s)"
                print(f"  {target.label} {rate}/s: not run (closed-loop capacity {capacity:,.0f} req/s)", flush=True)
                continue
            runs[rate] = s.bench.fixed(target, rate)
            print(_line(f"{target.label} {rate}/s", runs[rate]), flush=True)


def prompt_sizes(s: Setup, sizes: list[int]) -> None:
    print("\n3. prompt sizes, sequential (wrk c=1)", flush=True)
    for stream in (False, True):
        for size in sizes:
            body = bodies.encode(bodies.chat(size, stream))
            for target in s.main_targets:
                run = s.res.prompts.setdefault(target.label, {})[(size, stream)] = s.bench.closed(
                    target, 1, body, stream
                )
                print(
                    _line(f"{target.label} {report.size_label(size)}{' streamed' if stream else ''}", run), flush=True
                )


def profiles(s: Setup, py_spy: str) -> None:
    print("\n   profile (py-spy) of each gateway under wrk c=16", flush=True)
    for side in s.sides:
        out = os.path.join(s.workdir, "profile.txt")
        spy = profiling.record(py_spy, side.target.cpu["gateway"], max(1, round(s.bench.duration)), out)
        s.bench.closed(side.target, 16)
        _, err = spy.communicate(timeout=s.bench.duration + 60)
        text = Path(out).read_text() if os.path.exists(out) else ""
        if text:
            s.res.profiles[side.target.label] = profiling.report(text, limit=15)
        print(
            f"  {side.target.label}:\n"
            + (s.res.profiles.get(side.target.label) or f"  py-spy failed: {err.decode()[-500:]}"),
            flush=True,
        )


def tracing(s: Setup, rounds: int) -> None:
    """Tracing off, at 1 % and at 100 %: this checkout's gateway, paired (tracing_cost.py)."""
    side = s.sides[-1]  # this checkout
    print(f"-- tracing: off, 1 %, 100 % ({rounds} paired rounds)", flush=True)
    with Jaeger() as jaeger, contextlib.ExitStack() as stack:
        rows = tracing_cost.measure(
            s.bench, side.redis_url, side.redis_pid, s.json_base, jaeger, s.workdir, rounds, 16, stack
        )
    s.res.tracing = tracing_cost.table(rows, rounds, 16)


def held_at_once(s: Setup) -> None:
    """Long requests by the thousand (benchmarks.capacity), each gateway with its defaults."""
    print("\n10. long requests held at once, one gateway process with its defaults", flush=True)
    results = {
        side.src.label: capacity.measure(
            side.src, side.redis_url, s.mock, s.workdir, capacity.counts_from_env(), capacity.env_from_env()
        )
        for side in s.sides
    }
    s.res.capacity = capacity.table(results)


def per_gateway_checks(s: Setup) -> list[str]:
    """Memory, exactness and slow clients, each gateway in fresh processes; the failures."""
    failed = []
    for side in s.sides:
        src, redis_url = side.src, side.redis_url
        if not _on("BENCH_SKIP_MEMORY"):
            print(f"\n4. memory of {src.label}", flush=True)
            s.res.memory[src.label] = _memory(src, redis_url, s.mock, s.workdir)
        with src.start(redis_url, s.mock.url, s.workdir) as gw:
            exact = src.exactness(gw.url, redis_url)
        s.res.exactness[src.label] = exactness.summary(exact)
        print(f"\n5. exactness ({src.label}): {s.res.exactness[src.label]}", flush=True)
        if not exact["ok"]:
            failed.append(f"exactness of {src.label}")
        if not _on("BENCH_SKIP_SLOW"):
            with src.start(
                redis_url, s.mock.url, s.workdir, ATLAS_HEADER_TIMEOUT_SECONDS="5", ATLAS_BODY_TIMEOUT_SECONDS="10"
            ) as sgw:
                flood = asyncio.run(
                    slow_clients.flood(sgw.url, sgw.port, sgw.pid, BENCH_KEY, bodies.encode(bodies.SMALL))
                )
            s.res.slow_clients[src.label] = slow_clients.report(flood)
            print(f"   1,000 slow clients against {src.label}:\n{s.res.slow_clients[src.label]}", flush=True)
        if src.root == HERE_ROOT and not _on("BENCH_SKIP_TOKEN"):  # other checkouts may predate tokens
            token = token_auth.write_token_binding(redis_url)
            with src.start(redis_url, s.json_base, s.workdir) as gw:
                comparison = token_auth.compare(s.bench, gw.url, gw.pid, token)
            static_us, token_us = token_auth.authentication_cost()
            s.res.token_auth[src.label] = (
                f"{comparison.line()}; authentication alone, in-process: static key "
                f"{static_us:.2f} µs, token {token_us:.2f} µs"
            )
            print(
                f"\n7. workload identity token vs static key ({src.label}): {s.res.token_auth[src.label]}", flush=True
            )
            if comparison.errors:
                failed.append(f"token vs static key of {src.label}")
    return failed


def start(
    stack: contextlib.ExitStack,
    tl: tools.Tools,
    srcs: list[GatewaySource],
    res: report.Results,
    bench: Bench,
    workdir: str,
) -> Setup:
    static = stack.enter_context(nginx.static_upstream(tl.nginx, workdir))
    json_base, sse_base = static.url + nginx.JSON_BASE, static.url + nginx.SSE_BASE
    mock = stack.enter_context(MockUpstreamProcess())
    reference = Target(res.reference, json_base + CHAT, sse_base + CHAT, cpu={"nginx": static.pid})
    floors = []
    if not _on("BENCH_SKIP_FLOOR"):  # both forward every path as it is, so reach nginx's two locations
        proxy = stack.enter_context(nginx.reverse_proxy(tl.nginx, workdir, static.port))
        bare = stack.enter_context(floor.bare_forward("atlas/aiohttp", static.url, workdir))
        floors = [
            Target(
                report.NGINX_PROXY,
                proxy.url + nginx.JSON_BASE + CHAT,
                proxy.url + nginx.SSE_BASE + CHAT,
                cpu={"nginx proxy": proxy.pid},
            ),
            Target(
                report.BARE_FORWARD,
                bare.url + nginx.JSON_BASE + CHAT,
                bare.url + nginx.SSE_BASE + CHAT,
                cpu={"bare forward": bare.pid},
            ),
        ]
    sides = []
    external = os.environ.get("BENCH_REDIS_URL")  # a running Redis or Redis Cluster, shared by all
    for src in srcs:
        redis_url = external or stack.enter_context(RedisServer()).url
        redis_pid = src.write_bench_key(redis_url)
        gw = stack.enter_context(src.start(redis_url, json_base, workdir, {bodies.STREAM_MODEL: sse_base}))
        sides.append(Side(src, redis_url, redis_pid, gateway_target(f"{src.label} → nginx", gw, redis_pid)))
    peer = []
    lp = None
    if tl.litellm:
        try:
            lp = stack.enter_context(litellm_peer.peer(tl.litellm, json_base, sse_base, workdir))
        except ProcError as exc:  # the peer is a comparison, not what is measured: go on without it
            print(f"LiteLLM left out: {exc}", file=sys.stderr, flush=True)
    if lp is not None:
        res.peer = f"LiteLLM {Path(tl.litellm).parents[1].name.replace('litellm-', '')} (1 worker, no database, no limits) → nginx"
        peer.append(
            Target(
                res.peer,
                lp.url + CHAT,
                lp.url + CHAT,
                {"Authorization": f"Bearer {litellm_peer.MASTER_KEY}"},
                {"litellm": lp.pid},
            )
        )
    res.meta["versions"] = _versions(tl, res.peer)
    return Setup(
        bench,
        res,
        stack,
        workdir,
        json_base,
        sse_base,
        mock,
        sides,
        [reference] + floors + [side.target for side in sides] + peer,
    )


def main() -> int:
    duration = float(os.environ.get("BENCH_DURATION", "5"))
    warmup = float(os.environ.get("BENCH_WARMUP", "1"))
    srcs = sources()
    tl = tools.ensure(profile=_on("BENCH_PROFILE"), litellm=not _on("BENCH_SKIP_LITELLM"))
    workdir = tempfile.mkdtemp(prefix="atlas-bench-")
    started = time.monotonic()
    res = report.Results(gateways=[s.label for s in srcs])
    res.meta.update(
        started=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        load_before=_load(),
        duration=f"{duration:g}",
        machine=f"{os.cpu_count()} CPUs (the load averages above say what else ran).",
        note=os.environ.get("BENCH_NOTE", ""),
    )
    print(
        f"load average before: {res.meta['load_before']}; {os.cpu_count()} CPUs; {duration:g} s per load run; "
        f"gateways: {', '.join(f'{s.label} ({s.root})' for s in srcs)}",
        flush=True,
    )
    failed: list[str] = []
    try:
        with contextlib.ExitStack() as stack:
            setup = start(stack, tl, srcs, res, Bench(tl, workdir, duration, warmup), workdir)
            closed_loop(setup)
            fixed_rate(setup, _env_list("BENCH_RATES", "500,2000"))
            prompt_sizes(setup, _env_list("BENCH_PROMPT_SIZES", "1024,204800"))
            if not _on("BENCH_SKIP_TRACING"):
                tracing(setup, int(os.environ.get("BENCH_TRACING_ROUNDS", "6")))
            if tl.py_spy:
                profiles(setup, tl.py_spy)
            failed += per_gateway_checks(setup)
            if not _on("BENCH_SKIP_CAPACITY"):
                held_at_once(setup)
        if not _on("BENCH_SKIP_LEASES"):
            print("\n9. Redis CPU per admission vs requests in flight (this checkout)", flush=True)
            res.leases = lease_scale.report(lease_scale.run())
            print(res.leases, flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    res.meta.update(load_after=_load(), total_s=f"{time.monotonic() - started:.0f}")
    # the peer's errors are its own result (shown in the tables), not a broken bench
    ours = {t: runs for t, runs in res.closed.items() if t != res.peer}
    failed += [f"{target} c={c}" for target, runs in ours.items() for c, run in runs.items() if not run.valid]
    failed += [
        f"{target} {report.size_label(n)}{' streamed' if s else ''}"
        for target, runs in res.prompts.items()
        if target != res.peer
        for (n, s), run in runs.items()
        if not run.valid
    ]
    section = report.render(res)
    print("\n" + section)
    if os.environ.get("BENCH_WRITE_DOCS", "1") != "0":
        DOC.write_text(report.replace_section(DOC.read_text(), section))
        print(f"(written into {DOC.relative_to(DOC.parents[1])})")
    if failed:
        print(f"FAILED or INVALID: {'; '.join(failed)}")
    print(f"load average after: {res.meta['load_after']}; total {res.meta['total_s']} s")
    return 1 if failed else 0


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def _memory(src: GatewaySource, redis_url: str, mock: MockUpstreamProcess, workdir: str) -> dict:
    body = bodies.encode(bodies.SMALL)
    out = {}
    with src.start(redis_url, mock.url, workdir, ATLAS_KEEPALIVE_TIMEOUT_SECONDS="120") as gw:
        out["idle"] = asyncio.run(memory.idle_connections(gw.port, gw.pid, BENCH_KEY, body))
    with src.start(redis_url, mock.url, workdir) as gw:
        out["streams"] = asyncio.run(
            memory.open_streams(gw.port, gw.pid, BENCH_KEY, bodies.encode({**bodies.SMALL, "stream": True}))
        )
    for kind, d in out.items():
        print(
            f"  {kind}: {d['n']} → RSS {d['rss_before_kb'] / 1024:.1f} → {d['rss_after_kb'] / 1024:.1f} MiB, "
            f"{d['per_item_kb']:.1f} KiB each ({d['ok']} answered 200)",
            flush=True,
        )
    return out


def _versions(tl: tools.Tools, peer: str | None) -> str:
    import subprocess

    def first_line(args: list[str]) -> str:
        try:
            done = subprocess.run(args, capture_output=True, text=True, timeout=10)
            return (done.stdout or done.stderr).strip().splitlines()[0]
        except (OSError, IndexError, subprocess.SubprocessError):
            return "?"

    parts = [
        first_line([tl.nginx, "-v"]).replace("nginx version: ", ""),
        first_line([tl.wrk, "-v"]).split(" [")[0],
        "vegeta " + Path(tl.vegeta).parent.name.replace("vegeta-", ""),
        first_line(["redis-server", "--version"]).split(" sha=")[0],
    ]
    if peer:
        parts.append(peer.split(" (")[0])
    return ", ".join(parts)


if __name__ == "__main__":
    sys.exit(main())
