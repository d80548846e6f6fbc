"""Long requests by the thousand (issue 19): N requests held open at once through one gateway
process, with its defaults, to the mock upstream; how many were shed, and the gateway's memory
and open files per request in flight.

Each (N, streamed or not) runs in a fresh gateway process, warmed up first (Python keeps freed
memory: a second figure in the same process would reuse the first one's). Not streamed, the
mock holds each request (``x-mock-latency-ms``) before it answers; streamed, it sends the
response head and the first chunk at once, then holds the rest (``x-mock-chunk-delay-ms``).
The figures are sampled once every request has either got its 503 or is counted in flight by
the gateway (streamed: has its first chunk): a condition, not a sleep. A gateway holding N
requests needs 2N sockets (the client's and the upstream's); this machine allows 20,000 open
files per process, hence 9,000 as the largest N here (docs/capacity.md extrapolates).

Run alone: ``python -m benchmarks.capacity [N ...]`` (default ``BENCH_CAPACITY_N`` or
1000,4000,9000); ``BENCH_GATEWAY_SRC=/path/to/checkout`` adds another checkout's gateway (a
"before"), as in ``make bench``. ``BENCH_CAPACITY_ENV`` (``NAME=value,...``) sets gateway
variables for every run (default: none, the defaults are what is measured).

The requests are spread over ``BENCH_CAPACITY_KEYS`` keys (default 200, no limits; 1: the bench
key alone, every limit kind on it and its quota), so that the figures are the gateway's holding
them; a 503 that is not shedding (``quota_store_unavailable``, ``admission_queue_full``: Redis
behind a burst) is counted by its code.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass

from atlas_devstack.mock_upstream import MockUpstreamProcess
from atlas_devstack.redis_server import RedisServer
from atlas_devstack.waiting import wait_for_async

from . import bodies
from .gateways import GatewaySource, sources
from .keys import BENCH_KEY, spread_key
from .memory import _read_answer, _request
from .procs import rss_kb

HOLD_MS = 600_000  # long enough to outlast any measurement; the clients leave first
CONNECT_BATCH = 500  # connections opened at once (the listen backlog is 4,096 here)


def open_files(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@dataclass
class Held:
    n: int
    streamed: bool
    ok: int  # in flight upstream (not streamed) / streaming (200 and a first chunk)
    shed: int  # answered 503
    other: int  # anything else (errors)
    rss_before_kb: int
    rss_after_kb: int
    fds_before: int
    fds_after: int
    seconds: float  # until every request was in flight or answered

    @property
    def kib_per_request(self) -> float:
        return (self.rss_after_kb - self.rss_before_kb) / max(1, self.ok)

    @property
    def fds_per_request(self) -> float:
        return (self.fds_after - self.fds_before) / max(1, self.ok)

    def line(self) -> str:
        kind = "streamed" if self.streamed else "not streamed"
        return (
            f"{self.n:>6,} {kind:>12}: {self.ok:,} held, {self.shed:,} answered 503, {self.other} other; RSS "
            f"{self.rss_before_kb / 1024:,.0f} → {self.rss_after_kb / 1024:,.0f} MiB, "
            f"{self.kib_per_request:.1f} KiB per request; open files {self.fds_before:,} → {self.fds_after:,} "
            f"({self.fds_per_request:.2f} per request); {self.seconds:.1f} s to hold them all"
        )


async def _inflight(port: int) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: gw\r\n\r\n")
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(
            int(line.split(b":", 1)[1]) for line in head.lower().split(b"\r\n") if line.startswith(b"content-length:")
        )
        page = (await reader.readexactly(length)).decode()
    finally:
        writer.close()
    for line in page.splitlines():
        if line.startswith("atlas_gateway_inflight_requests "):
            return int(float(line.split()[1]))
    return 0


async def hold(port: int, pid: int, n: int, streamed: bool, keys: int = 1) -> Held:
    small = bodies.encode(bodies.SMALL)
    key_of = (lambda i: BENCH_KEY) if keys <= 1 else (lambda i: spread_key(i % keys))
    for _ in range(2):  # warm: both paths, and the connection pools, before the first figure
        await asyncio.gather(*(_one(port, key_of(i), small) for i in range(50)))
    rss_before, fds_before = rss_kb(pid), open_files(pid)
    body = bodies.encode({**bodies.SMALL, "stream": streamed})
    extra = (
        {"x-mock-chunk-delay-ms": str(HOLD_MS), "x-mock-completion-tokens": "2"}
        if streamed
        else {"x-mock-latency-ms": str(HOLD_MS)}
    )
    started = time.monotonic()
    conns = []
    answers: list[asyncio.Task] = []
    try:
        for i in range(0, n, CONNECT_BATCH):
            batch = await asyncio.gather(
                *(asyncio.open_connection("127.0.0.1", port) for _ in range(min(CONNECT_BATCH, n - i)))
            )
            for j, (reader, writer) in enumerate(batch):
                writer.write(_request(key_of(i + j), body, extra))
                answers.append(asyncio.ensure_future(_status(reader, streamed)))
            conns += batch

        async def all_held() -> bool:
            answered = [t.result() for t in answers if t.done()]
            if streamed:
                return len(answered) == n
            return len(answered) + await _inflight(port) >= n

        await wait_for_async(f"{n} requests held or answered", all_held, 300, interval=0.5)
        seconds = time.monotonic() - started
        rss_after, fds_after = rss_kb(pid), open_files(pid)
        statuses = [t.result() for t in answers if t.done()]
    finally:
        for t in answers:
            t.cancel()
        for _, writer in conns:
            writer.close()
    ok = statuses.count(200) if streamed else n - len(statuses)
    shed = statuses.count(503)
    return Held(
        n,
        streamed,
        ok,
        shed,
        len(statuses) - shed - (statuses.count(200) if streamed else 0),
        rss_before,
        rss_after,
        fds_before,
        fds_after,
        seconds,
    )


async def _one(port: int, key: str, body: bytes) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(_request(key, body))
        return await _read_answer(reader)
    finally:
        writer.close()


async def _status(reader: asyncio.StreamReader, streamed: bool) -> int:
    """The answer's status; streamed, once its first chunk arrived too. A refusal's error code
    is counted in ``REFUSALS`` (a 503 may be shedding, or Redis, or the connection cap)."""
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    if streamed and status == 200:
        await reader.readuntil(b"\n\n")
    elif status != 200:
        length = next(
            (
                int(line.split(b":", 1)[1])
                for line in head.lower().split(b"\r\n")
                if line.startswith(b"content-length:")
            ),
            0,
        )
        try:
            code = json.loads(await reader.readexactly(length))["error"]["code"]
        except (ValueError, KeyError, TypeError, asyncio.IncompleteReadError):
            code = "?"
        REFUSALS[f"{status} {code}"] = REFUSALS.get(f"{status} {code}", 0) + 1
    return status


REFUSALS: dict[str, int] = {}  # "503 overloaded" -> count, over the whole run


def measure(
    src: GatewaySource,
    redis_url: str,
    mock: MockUpstreamProcess,
    workdir: str,
    counts: list[int],
    extra_env: dict[str, str] | None = None,
    keys: int | None = None,
) -> list[Held]:
    """Each N, not streamed and streamed, in fresh gateway processes of ``src``; its keys are
    written into ``redis_url`` first."""
    keys = keys_from_env() if keys is None else keys
    if keys > 1:
        src.run_helper("keys", redis_url, "--spread", str(keys))
    out = []
    for n in counts:
        for streamed in (False, True):
            with src.start(redis_url, mock.url, workdir, **(extra_env or {})) as gw:
                held = asyncio.run(hold(gw.port, gw.pid, n, streamed, keys))
            print(f"  {src.label} {held.line()}" + (f" (refusals: {REFUSALS})" if REFUSALS else ""), flush=True)
            REFUSALS.clear()
            out.append(held)
    return out


def table(results: dict[str, list[Held]]) -> str:
    rows = [
        "| gateway | N | streamed | held | 503 | RSS before → after | per request | open files before → "
        "after | per request |",
        "|---|---:|---|---:|---:|---|---:|---|---:|",
    ]
    for label, helds in results.items():
        for h in helds:
            rows.append(
                f"| {label} | {h.n:,} | {'yes' if h.streamed else 'no'} | {h.ok:,} | {h.shed:,} | "
                f"{h.rss_before_kb / 1024:,.0f} → {h.rss_after_kb / 1024:,.0f} MiB | "
                f"{h.kib_per_request:.1f} KiB | {h.fds_before:,} → {h.fds_after:,} | "
                f"{h.fds_per_request:.2f} |"
            )
    return "\n".join(rows)


def counts_from_env() -> list[int]:
    return [int(x) for x in os.environ.get("BENCH_CAPACITY_N", "1000,4000,9000").split(",") if x.strip()]


def keys_from_env() -> int:
    return int(os.environ.get("BENCH_CAPACITY_KEYS", "200"))


def env_from_env() -> dict[str, str]:
    raw = os.environ.get("BENCH_CAPACITY_ENV", "")
    return dict(item.split("=", 1) for item in raw.split(",") if "=" in item)


def main(argv: list[str]) -> int:
    counts = [int(a) for a in argv] or counts_from_env()
    results: dict[str, list[Held]] = {}
    workdir = tempfile.mkdtemp(prefix="atlas-capacity-")
    with contextlib.ExitStack() as stack:
        mock = stack.enter_context(MockUpstreamProcess())
        for src in sources():
            redis_url = stack.enter_context(RedisServer()).url
            src.write_bench_key(redis_url)
            results[src.label] = measure(src, redis_url, mock, workdir, counts, env_from_env())
    print("\n" + table(results))
    print(json.dumps({label: [h.__dict__ for h in helds] for label, helds in results.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
