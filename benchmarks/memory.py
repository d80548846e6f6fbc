"""Memory per idle connection and per open stream: the gateway's RSS delta with N keep-alive
connections that each served one request and now sit idle, and with N streams held open by a
slow-streaming upstream (the mock, one chunk a second), divided by N.

Each figure comes from a fresh gateway process warmed up first (Python keeps freed memory, so
a second measurement in the same process would reuse the first one's), and is sampled once
every connection has got its answer (idle) or its response headers (streams): a condition,
not a sleep.
"""

from __future__ import annotations

import asyncio

from .procs import rss_kb

IDLE_CONNECTIONS = 1000
IDLE_BATCH = 100
OPEN_STREAMS = 200  # thousands: benchmarks.capacity


def _request(key: str, body: bytes, extra: dict[str, str] | None = None) -> bytes:
    head = [
        "POST /v1/chat/completions HTTP/1.1",
        "Host: gateway",
        f"Authorization: Bearer {key}",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
    ]
    head += [f"{k}: {v}" for k, v in (extra or {}).items()]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


async def _read_answer(reader: asyncio.StreamReader) -> int:
    """Read one HTTP/1.1 answer (Content-Length or chunked); its status."""
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    headers = head.lower()
    if b"transfer-encoding: chunked" in headers:
        while True:
            size = int((await reader.readline()).strip().split(b";")[0], 16)
            await reader.readexactly(size + 2)
            if size == 0:
                return status
    length = 0
    for line in headers.split(b"\r\n"):
        if line.startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    await reader.readexactly(length)
    return status


async def _warm(port: int, key: str, body: bytes, n: int = 200) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for _ in range(n):
            writer.write(_request(key, body))
            await _read_answer(reader)
    finally:
        writer.close()


async def idle_connections(port: int, pid: int, key: str, body: bytes, n: int = IDLE_CONNECTIONS) -> dict:
    await _warm(port, key, body)
    before = rss_kb(pid)
    conns = [await asyncio.open_connection("127.0.0.1", port) for _ in range(n)]
    statuses: list[int] = []
    try:
        # in batches: what is measured is idle connections, not a burst of admissions
        for i in range(0, n, IDLE_BATCH):
            batch = conns[i : i + IDLE_BATCH]
            for _, writer in batch:
                writer.write(_request(key, body))
            statuses += await asyncio.gather(*(_read_answer(reader) for reader, _ in batch))
        after = rss_kb(pid)  # every connection answered, kept alive, idle
    finally:
        for _, writer in conns:
            writer.close()
    ok = statuses.count(200)
    return {"n": n, "ok": ok, "rss_before_kb": before, "rss_after_kb": after, "per_item_kb": (after - before) / n}


async def open_streams(
    port: int, pid: int, key: str, body: bytes, n: int = OPEN_STREAMS, chunk_delay_ms: int = 1000
) -> dict:
    await _warm(port, key, body)
    before = rss_kb(pid)
    slow = {"x-mock-chunk-delay-ms": str(chunk_delay_ms)}
    conns = [await asyncio.open_connection("127.0.0.1", port) for _ in range(n)]
    try:
        for _, writer in conns:
            writer.write(_request(key, body, slow))
        heads = await asyncio.gather(*(reader.readuntil(b"\r\n\r\n") for reader, _ in conns))
        # the first chunk too: the stream is under way upstream and downstream
        await asyncio.gather(*(reader.readuntil(b"\n\n") for reader, _ in conns))
        after = rss_kb(pid)
    finally:
        for _, writer in conns:
            writer.close()  # a client going away mid-stream: the gateway must cope
    ok = sum(1 for h in heads if h.split(b" ", 2)[1] == b"200")
    return {"n": n, "ok": ok, "rss_before_kb": before, "rss_after_kb": after, "per_item_kb": (after - before) / n}
