"""A minimal pipelining RESP client for the two hot-path script calls.

Measured on the 2-core bench machine, redis-py's asyncio client spends more CPU per EVALSHA
(argument encoding, connection-pool bookkeeping, RESP3 parsing) than aiohttp spends on the
whole upstream request. This client keeps one connection, writes pre-encoded commands and
matches replies to waiters in order (Redis answers a connection's commands in order), so
concurrent requests are pipelined for free. It does exactly what the hot path needs:
EVALSHA/SCRIPT LOAD, AUTH and SELECT. Everything else (config reads, /v1/usage, /readyz)
uses redis-py.

Failure handling: a lost connection fails every waiting call with ``ConnectionError`` and the
next call reconnects; a call that takes longer than ``timeout`` fails with ``TimeoutError``
and drops the connection (its late reply must not be matched to someone else's call).
"""

from __future__ import annotations

import asyncio
from collections import deque
from urllib.parse import unquote, urlparse


class ReplyError(Exception):
    """An error reply from Redis (``-ERR ...``, ``-NOSCRIPT ...``)."""


class _Incomplete(Exception):
    pass


def pack_args(args) -> bytes:
    """Bulk-string encoding of each argument (the body of a command, without its header)."""
    return b"".join([b"$%d\r\n%s\r\n" % (len(arg), arg) for arg in args])


def pack(args: tuple[bytes, ...]) -> bytes:
    return b"*%d\r\n" % len(args) + pack_args(args)


def parse(buf: bytearray, pos: int):
    """One RESP2 reply from ``buf`` at ``pos`` -> (value, next position); raises _Incomplete."""
    nl = buf.find(b"\r\n", pos)
    if nl < 0:
        raise _Incomplete
    kind = buf[pos]
    line = buf[pos + 1:nl]
    pos = nl + 2
    if kind == 58:  # ':' integer
        return int(line), pos
    if kind == 42:  # '*' array
        count = int(line)
        if count < 0:
            return None, pos
        out = []
        for _ in range(count):
            value, pos = parse(buf, pos)
            out.append(value)
        return out, pos
    if kind == 36:  # '$' bulk string
        size = int(line)
        if size < 0:
            return None, pos
        if len(buf) < pos + size + 2:
            raise _Incomplete
        return bytes(buf[pos:pos + size]), pos + size + 2
    if kind == 43:  # '+' simple string
        return bytes(line), pos
    if kind == 45:  # '-' error
        return ReplyError(line.decode("utf-8", "replace")), pos
    raise ReplyError(f"unexpected RESP type byte {kind!r}")


class _Protocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.buf = bytearray()
        self.waiters: deque[asyncio.Future] = deque()
        self.transport: asyncio.Transport | None = None
        self.closed = False
        # Commands issued during one event-loop iteration leave together in one write, at the
        # end of the iteration. On loopback each send() (and each recv() of the replies) costs
        # about as much CPU as the rest of a request, so under concurrency this removes most of
        # the Redis I/O cost, Redis's own included. (Measured against holding commands back
        # while a batch is unanswered: that batches more, but a new admission then waits for
        # the previous request's settlement reply, which costs latency at concurrency 1.)
        self.outgoing: list[bytes] = []

    def enqueue(self, data: bytes) -> None:
        if not self.outgoing:
            asyncio.get_running_loop().call_soon(self.flush)
        self.outgoing.append(data)

    def flush(self) -> None:
        data, self.outgoing = self.outgoing, []
        if data and not self.closed and self.transport is not None:
            self.transport.write(data[0] if len(data) == 1 else b"".join(data))

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        pos = 0
        waiters = self.waiters
        while waiters:
            try:
                value, pos = parse(buf, pos)
            except _Incomplete:
                break
            fut = waiters.popleft()
            if not fut.done():
                if isinstance(value, ReplyError):
                    fut.set_exception(value)
                else:
                    fut.set_result(value)
        if pos:
            del buf[:pos]

    def connection_lost(self, exc) -> None:
        self.closed = True
        while self.waiters:
            fut = self.waiters.popleft()
            if not fut.done():
                fut.set_exception(ConnectionError("connection to Redis lost"))

    def close(self) -> None:
        if not self.closed and self.transport is not None:
            self.transport.close()
        self.connection_lost(None)


def _expire(fut: asyncio.Future, proto: _Protocol) -> None:
    if not fut.done():
        fut.set_exception(TimeoutError("Redis did not answer in time"))
        proto.close()


class FastRedis:
    def __init__(self, url: str, timeout: float = 0.5) -> None:
        parsed = urlparse(url)
        if parsed.scheme not in ("redis", ""):
            raise ValueError("the fast Redis client supports redis:// URLs only")
        self.host = parsed.hostname or "127.0.0.1"
        self.port = parsed.port or 6379
        self.username = unquote(parsed.username) if parsed.username else None
        self.password = unquote(parsed.password) if parsed.password else None
        path = (parsed.path or "/").lstrip("/")
        self.db = int(path) if path else 0
        self.timeout = timeout
        self._proto: _Protocol | None = None
        self._connecting: asyncio.Future | None = None

    async def _connect(self) -> _Protocol:
        loop = asyncio.get_running_loop()
        _, proto = await asyncio.wait_for(
            loop.create_connection(_Protocol, self.host, self.port), self.timeout
        )
        self._proto = proto
        if self.password is not None:
            auth = (b"AUTH", self.username.encode(), self.password.encode()) if self.username else (
                b"AUTH", self.password.encode())
            await self._call(proto, auth)
        if self.db:
            await self._call(proto, (b"SELECT", str(self.db).encode()))
        return proto

    async def _connection(self) -> _Protocol:
        if self._connecting is not None:  # someone else is connecting: share the result
            return await asyncio.shield(self._connecting)
        self._connecting = asyncio.ensure_future(self._connect())
        try:
            return await asyncio.shield(self._connecting)
        finally:
            self._connecting = None

    def _call(self, proto: _Protocol, args: tuple[bytes, ...]) -> asyncio.Future:
        return self._send(proto, pack(args))

    def _send(self, proto: _Protocol, command: bytes) -> asyncio.Future:
        fut = asyncio.get_running_loop().create_future()
        proto.waiters.append(fut)
        proto.enqueue(command)
        handle = fut.get_loop().call_later(self.timeout, _expire, fut, proto)
        fut.add_done_callback(lambda _f: handle.cancel())
        return fut

    async def execute(self, *args: bytes):
        proto = self._proto
        if proto is None or proto.closed:
            proto = await self._connection()
        return await self._call(proto, args)

    async def execute_raw(self, command: bytes):
        """Send one already RESP-encoded command (see scripts.FastScript.call_encoded)."""
        proto = self._proto
        if proto is None or proto.closed:
            proto = await self._connection()
        return await self._send(proto, command)

    async def aclose(self) -> None:
        if self._proto is not None:
            self._proto.close()
            self._proto = None
