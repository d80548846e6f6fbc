"""1,000 slow and hostile clients against one gateway process: its memory and open sockets over
time, and the latency a normal client sees meanwhile (``make bench``; alone:
``python -m benchmarks.slow_clients``).

The flood: 400 sockets that send nothing, 300 that send their headers a byte per second, 200
that send a known key's headers announcing 4 MB and then the body a byte per second, and 100
unknown keys that announce 4 MB and send it at full speed. The gateway runs with
ATLAS_HEADER_TIMEOUT_SECONDS=5 and ATLAS_BODY_TIMEOUT_SECONDS=10 (defaults 10 and 30) so that
the run is short.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import time
import urllib.request

MB4 = 4 * 1024 * 1024


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def sockets(pid: int) -> int:
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:"):
                count += 1
        except OSError:
            pass
    return count


def head(key: str, length: int) -> bytes:
    return (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {key}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {length}\r\n\r\n"
    ).encode()


async def _client(port: int, kind: str, key: str, stop: asyncio.Event, closed: list[int]) -> None:
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        closed.append(1)
        return
    senders: set[asyncio.Future] = set()  # held here: the loop keeps only weak references to tasks

    async def send_slowly(data: bytes) -> None:
        for i in range(len(data)):
            if stop.is_set() or reader.at_eof():
                return
            writer.write(data[i : i + 1])
            await writer.drain()
            try:
                await asyncio.wait_for(stop.wait(), 1.0)
            except asyncio.TimeoutError:
                pass

    try:
        if kind == "idle":
            pass
        elif kind == "slow-headers":
            senders.add(asyncio.ensure_future(send_slowly(head(key, 10))))
        elif kind == "slow-body":
            writer.write(head(key, MB4))
            senders.add(asyncio.ensure_future(send_slowly(b"{" + b" " * 1000)))
        elif kind == "unknown-4mb":
            writer.write(head("sk-not-a-known-key", MB4))
            writer.write(b"{" + b" " * (MB4 - 1))
        # held until the server closes it or the run ends
        read = asyncio.ensure_future(reader.read(65536 * 100))
        done, _ = await asyncio.wait({read, asyncio.ensure_future(stop.wait())}, return_when=asyncio.FIRST_COMPLETED)
        if read in done and not stop.is_set():
            while not reader.at_eof() and not stop.is_set():
                if not await reader.read(65536):
                    break
            closed.append(1)
        read.cancel()
    except (OSError, asyncio.IncompleteReadError):
        closed.append(1)
    finally:
        for sender in senders:
            sender.cancel()
        writer.close()


def _timed_request(url: str, key: str, body: bytes) -> float:
    req = urllib.request.Request(
        url + "/v1/chat/completions",
        data=body,
        method="POST",
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
    )
    started = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            resp.read()
            ok = resp.status == 200
    except OSError:
        ok = False
    return (time.perf_counter() - started) * 1000 if ok else float("nan")


async def flood(url: str, port: int, pid: int, key: str, body: bytes, seconds: float = 16.0) -> dict:
    stop = asyncio.Event()
    closed: list[int] = []
    kinds = ["idle"] * 400 + ["slow-headers"] * 300 + ["slow-body"] * 200 + ["unknown-4mb"] * 100
    base_rss, base_sockets = rss_mb(pid), sockets(pid)
    tasks = [asyncio.ensure_future(_client(port, kind, key, stop, closed)) for kind in kinds]
    samples = []
    latencies: list[float] = []
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        await asyncio.sleep(1.0)  # a sampling period, not a synchronisation
        latency = await asyncio.get_running_loop().run_in_executor(None, _timed_request, url, key, body)
        latencies.append(latency)
        samples.append((time.monotonic() - started, rss_mb(pid), sockets(pid) - base_sockets, len(closed), latency))
    stop.set()
    await asyncio.gather(*tasks, return_exceptions=True)
    served = [x for x in latencies if x == x]
    return {
        "base_rss": base_rss,
        "peak_rss": max(s[1] for s in samples),
        "peak_sockets": max(s[2] for s in samples),
        "end_sockets": samples[-1][2],
        "closed_by_gateway": samples[-1][3],
        "served": f"{len(served)}/{len(latencies)}",
        "served_p50_ms": statistics.median(served) if served else float("nan"),
        "samples": samples,
    }


def report(res: dict) -> str:
    lines = ["  t(s)  RSS MB  open sockets  closed by gateway  normal request ms"]
    for t, rss, socks, closed, latency in res["samples"]:
        lines.append(f"  {t:4.0f}  {rss:6.1f}  {socks:12d}  {closed:17d}  {latency:8.1f}")
    lines.append(
        f"  RSS {res['base_rss']:.1f} -> peak {res['peak_rss']:.1f} MB; open sockets peak "
        f"{res['peak_sockets']}, at the end {res['end_sockets']}; normal requests served "
        f"{res['served']}, p50 {res['served_p50_ms']:.1f} ms"
    )
    return "\n".join(lines)


def main() -> None:
    import tempfile

    from atlas_devstack.mock_upstream import MockUpstreamProcess
    from atlas_devstack.redis_server import RedisServer

    from . import bodies
    from .gateways import sources
    from .keys import BENCH_KEY

    src = sources()[-1]
    workdir = tempfile.mkdtemp(prefix="atlas-slow-")
    with RedisServer() as rs, MockUpstreamProcess() as mock:
        src.write_bench_key(rs.url)
        with src.start(
            rs.url, mock.url, workdir, ATLAS_HEADER_TIMEOUT_SECONDS="5", ATLAS_BODY_TIMEOUT_SECONDS="10"
        ) as gw:
            res = asyncio.run(flood(gw.url, gw.port, gw.pid, BENCH_KEY, bodies.encode(bodies.SMALL)))
    print(f"1,000 slow clients against one gateway process ({src.label}):")
    print(report(res))


if __name__ == "__main__":
    main()
