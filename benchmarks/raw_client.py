"""A minimal keep-alive HTTP/1.1 client on asyncio protocols and httptools' response parser: the
cheapest upstream client a Python gateway could have, measured against aiohttp and httpx on the
bare forward (benchmarks.floor). Non-streaming POSTs only; no TLS, redirects, or chunked
request bodies: a measurement, not a client Atlas uses.
"""

from __future__ import annotations

import asyncio
from urllib.parse import urlsplit

import httptools


class _Connection(asyncio.Protocol):
    __slots__ = ("transport", "parser", "waiter", "status", "ctype", "chunks", "_name", "closed")

    def __init__(self) -> None:
        self.transport = None
        self.parser = httptools.HttpResponseParser(self)
        self.waiter: asyncio.Future | None = None
        self.chunks: list[bytes] = []
        self.ctype = b"application/json"
        self._name = b""
        self.closed = False

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(exc)

    def connection_lost(self, exc) -> None:
        self.closed = True
        self._fail(exc or ConnectionResetError("upstream closed the connection"))

    def _fail(self, exc: BaseException) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(exc)

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"content-type":
            self.ctype = value

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)

    def on_message_complete(self) -> None:
        body = self.chunks[0] if len(self.chunks) == 1 else b"".join(self.chunks)
        self.chunks = []
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result((self.parser.get_status_code(), self.ctype, body))


class RawClient:
    def __init__(self, base: str) -> None:
        parts = urlsplit(base)
        self.host, self.port = parts.hostname, parts.port or 80
        self.prefix = parts.path.rstrip("/")
        self.host_header = f"{self.host}:{self.port}".encode()
        self.idle: list[_Connection] = []

    async def post(self, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, bytes, bytes]:
        loop = asyncio.get_running_loop()
        conn = None
        while self.idle:
            conn = self.idle.pop()
            if not conn.closed:
                break
            conn = None
        if conn is None:
            _, conn = await loop.create_connection(_Connection, self.host, self.port)
        head = [
            b"POST ",
            (self.prefix + path).encode(),
            b" HTTP/1.1\r\nhost: ",
            self.host_header,
            b"\r\ncontent-length: ",
            str(len(body)).encode(),
            b"\r\n",
        ]
        for name, value in headers.items():
            head += [name.encode(), b": ", value.encode(), b"\r\n"]
        head.append(b"\r\n")
        conn.waiter = loop.create_future()
        conn.transport.write(b"".join(head) + body)
        try:
            result = await conn.waiter
        except BaseException:
            conn.transport.close()
            raise
        conn.waiter = None
        if conn.parser.should_keep_alive() and not conn.closed:
            self.idle.append(conn)
        else:
            conn.transport.close()
        return result

    async def close(self) -> None:
        for conn in self.idle:
            conn.transport.close()
        self.idle.clear()
