"""A minimal pipelining RESP client for the two hot-path script calls.

redis-py's asyncio client spends more CPU per EVALSHA (argument encoding, connection-pool
bookkeeping, RESP3 parsing) than aiohttp spends on the whole upstream request
(docs/benchmarks.md, "What was changed because of these measurements"). This client keeps one connection, writes pre-encoded commands and
matches replies to waiters in order (Redis answers a connection's commands in order), so
concurrent requests are pipelined for free. It does exactly what the hot path needs:
EVALSHA/SCRIPT LOAD, AUTH and SELECT, over TCP or TLS (``rediss://``); replies are parsed by
hiredis. /readyz pings through it too; config reads and /v1/usage use redis-py. With a
``redis+sentinel://`` URL it asks the sentinels for the master on every (re)connect and checks
``ROLE`` before using the connection (atlas_core/sentinel.py); a ``READONLY`` reply (its master
was demoted under it) drops the connection, so the next call finds the new master.

Failure handling: a lost connection fails every waiting call with ``ConnectionError`` and the
next call reconnects; a connection that stays silent for ``timeout`` after the oldest waiting
call was written fails that call with ``TimeoutError`` and is dropped (its late reply must not be matched to someone
else's call). Silent, not slow: calls queued behind others on a connection whose replies keep
arriving are waiting their turn on a live Redis, not facing an outage, so each reply gives the
oldest call another ``timeout`` (a burst of thousands of admissions is answered, not failed as
"Redis unreachable": docs/design-decisions.md; how many may queue is bounded by the ledger).
Both failures mean "the command may or may not have run"; ``NotSent`` means it certainly did
not (no connection). A connection is used only once its AUTH/SELECT handshake succeeded.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable

import hiredis

from atlas_core import sentinel
from atlas_core.redis_url import RedisAddress


class ReplyError(Exception):
    """An error reply from Redis (``-ERR ...``, ``-NOSCRIPT ...``, ``-OOM ...``, ``-NOAUTH ...``):
    Redis is reachable and refused the command. Not a transport failure."""


class NotSent(ConnectionError):
    """No connection could be made: the command never left this process (nothing to undo)."""


def pack_args(args) -> bytes:
    """Bulk-string encoding of each argument (the body of a command, without its header)."""
    return b"".join([b"$%d\r\n%s\r\n" % (len(arg), arg) for arg in args])


def pack(args: tuple[bytes, ...]) -> bytes:
    return b"*%d\r\n" % len(args) + pack_args(args)


def reply_reader() -> hiredis.Reader:
    """hiredis' RESP parser (C): error replies come back as ReplyError instances."""
    return hiredis.Reader(replyError=ReplyError)


GRACE_TURNS = 16  # event-loop turns a timed-out wait is given to notice an answer already there


async def patient_wait_for(aw, timeout: float):
    """``asyncio.wait_for``, except that an event loop too busy to look (a burst of thousands of
    requests parsed in one turn) is not taken for a Redis that does not answer: when the timeout
    passes, the awaited call gets a few more loop turns, each one reading the sockets, before it
    is cancelled. A connection Redis accepted meanwhile is used; a silent one still times out."""
    task = asyncio.ensure_future(aw)
    done, _ = await asyncio.wait((task,), timeout=timeout)
    for _ in range(GRACE_TURNS):
        if done or task.done():
            return task.result()
        await asyncio.sleep(0)
    if task.done():
        return task.result()
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass
    raise asyncio.TimeoutError()


class _Protocol(asyncio.Protocol):
    def __init__(self, timeout: float = 0.5) -> None:
        self.reader = reply_reader()
        # (future, deadline) per command sent, in order. Redis answers in order, so only the
        # oldest can be the first to time out: one watchdog timer per connection checks it,
        # instead of a timer (and its cancellation) per call, which was a measurable share of
        # a call's cost.
        self.waiters: deque[tuple[asyncio.Future, float]] = deque()
        self.timeout = timeout
        # Silence is measured from when the oldest waiting call left this process (not from
        # when it was issued: a busy event loop may hold a batch back) or from the last bytes
        # Redis sent, whichever is later. ``flushes``: (commands written so far, loop time) per
        # write, so that the oldest unanswered call's write is found without a timestamp per call.
        self.last_reply = 0.0
        self.sent = 0
        self.answered = 0
        self.flushes: deque[tuple[int, float]] = deque()
        self.watchdog: asyncio.TimerHandle | None = None
        self.transport: asyncio.Transport | None = None
        self.closed = False
        # Commands issued during one event-loop iteration leave together in one write, at the
        # end of the iteration. On loopback each send() (and each recv() of the replies) costs
        # about as much CPU as the rest of a request, so under concurrency this removes most of
        # the Redis I/O cost, Redis's own included (docs/benchmarks.md). Holding commands back
        # while a batch is unanswered would batch more, but a new admission would then wait for
        # the previous request's settlement reply: latency at concurrency 1.
        self.outgoing: list[bytes] = []
        # this connection's loop, kept: on Python 3.11 every asyncio.get_running_loop() is a
        # getpid() system call, and this runs twice per Redis call
        self.loop: asyncio.AbstractEventLoop  # set by connection_made, before any call
        self.atlas_wait: tuple[asyncio.Future, float] | None = None  # store/cluster.py: this batch's WAIT

    def call(self, command: bytes) -> asyncio.Future:
        loop = self.loop
        fut = loop.create_future()
        self.waiters.append((fut, loop.time() + self.timeout))
        self.enqueue(command)
        if self.watchdog is None:
            self.watchdog = loop.call_later(self.timeout, self.check_deadline)
        return fut

    def check_deadline(self) -> None:
        """Fail the oldest call (and drop the connection) once it is overdue; re-arm otherwise."""
        self.watchdog = None
        flushes = self.flushes
        if not self.waiters or self.closed:
            flushes.clear()
            return
        fut, deadline = self.waiters[0]
        loop = fut.get_loop()
        now = loop.time()
        while flushes and flushes[0][0] <= self.answered:
            flushes.popleft()
        sent_at = flushes[0][1] if flushes else now  # none: not written yet (the loop was busy)
        # overdue only once Redis stayed silent for a whole timeout after the call was written: a
        # reply since means it is queued behind others on a live connection
        deadline = max(deadline, sent_at + self.timeout, self.last_reply + self.timeout)
        if now >= deadline:
            if not fut.done():
                # its late reply must not be matched to someone else's call: drop the connection
                fut.set_exception(TimeoutError("Redis did not answer in time"))
            self.close()
            return
        self.watchdog = loop.call_at(deadline, self.check_deadline)

    def enqueue(self, data: bytes) -> None:
        if not self.outgoing:
            self.loop.call_soon(self.flush)
        self.outgoing.append(data)

    def flush(self) -> None:
        data, self.outgoing = self.outgoing, []
        if data and not self.closed and self.transport is not None:
            self.sent += len(data)
            self.flushes.append((self.sent, self.loop.time()))
            self.transport.write(data[0] if len(data) == 1 else b"".join(data))

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.loop = asyncio.get_running_loop()

    def data_received(self, data: bytes) -> None:
        self.last_reply = self.loop.time()  # any byte from Redis: it is alive and answering
        reader = self.reader
        reader.feed(data)
        waiters = self.waiters
        demoted = False
        while waiters:
            value = reader.gets()
            if value is False:
                break
            fut = waiters.popleft()[0]
            self.answered += 1
            if isinstance(value, ReplyError) and value.args and value.args[0].startswith("READONLY"):
                demoted = True  # the server is now a replica: find the master on the next call
            if not fut.done():
                if isinstance(value, ReplyError):
                    fut.set_exception(value)
                else:
                    fut.set_result(value)
        if demoted:
            self.close()

    def connection_lost(self, exc) -> None:
        self.closed = True
        if self.watchdog is not None:
            self.watchdog.cancel()
            self.watchdog = None
        while self.waiters:
            fut = self.waiters.popleft()[0]
            if not fut.done():
                fut.set_exception(ConnectionError("connection to Redis lost"))

    def close(self) -> None:
        if not self.closed and self.transport is not None:
            self.transport.close()
        self.connection_lost(None)


class FastRedis:
    def __init__(self, url: str, timeout: float = 0.5) -> None:
        self.timeout = timeout
        self._proto: _Protocol | None = None
        self._connecting: asyncio.Future | None = None
        # where the server is: fixed (redis://) or asked of the sentinels on each connect
        self.locator: sentinel.MasterLocator | None = None
        self.master: tuple[str, int] | None = None  # the master last connected to (Sentinel)
        # called (no arguments) when a reconnect finds another master
        self.on_master_change: Callable[[], None] | None = None
        if sentinel.is_sentinel_url(url):
            config = sentinel.parse(url)
            self.locator = sentinel.MasterLocator(config, timeout)
            self.host, self.port = config.sentinels[0]  # replaced by the master's on connect
            self.username, self.password, self.db = config.username, config.password, config.db
            tls = config.tls_options
        else:
            address = RedisAddress.parse(url)  # ValueError: not redis:// or rediss://, or a bad option
            self.host, self.port, self.db = address.host, address.port, address.db
            self.username, self.password, tls = address.username, address.password, address.tls
        # the same TLS options as redis-py reads from the same URL (atlas_core/redis_url.py)
        self.ssl = tls.ssl_context() if tls is not None else None

    async def _address(self) -> tuple[str, int]:
        return (self.host, self.port) if self.locator is None else await self.locator.address()

    async def _connect(self) -> _Protocol:
        """A connection that has completed its handshake (AUTH, SELECT). Only then is it
        published as ``self._proto``: a call made meanwhile waits for this connection instead of
        running unauthenticated or in database 0. A failed handshake closes it."""
        loop = asyncio.get_running_loop()
        host, port = await self._address()
        _, proto = await patient_wait_for(
            loop.create_connection(
                self._protocol, host, port, ssl=self.ssl, server_hostname=host if self.ssl is not None else None
            ),
            self.timeout,
        )
        try:
            if self.password is not None:
                auth = (
                    (b"AUTH", self.username.encode(), self.password.encode())
                    if self.username
                    else (b"AUTH", self.password.encode())
                )
                await self._call(proto, auth)
            if self.db:
                await self._call(proto, (b"SELECT", str(self.db).encode()))
            if self.locator is not None:
                await self._check_role(proto, self.locator)
        except BaseException:
            proto.close()
            raise
        if self.locator is not None:
            previous, self.master = self.master, (host, port)
            if previous is not None and previous != self.master and self.on_master_change is not None:
                self.on_master_change()
        self._proto = proto
        return proto

    async def _check_role(self, proto: _Protocol, locator: sentinel.MasterLocator) -> None:
        try:
            reply = await self._call(proto, (b"ROLE",))
        except ReplyError as exc:
            if str(exc).startswith("NOPERM"):
                return  # an ACL user without ROLE: READONLY replies still reveal a demoted master
            raise
        locator.check_role(reply)
        if locator.fenced:  # a failover began while this connection was being made
            raise sentinel.MasterUnavailable("a failover is under way")

    async def _connection(self) -> _Protocol:
        if self._connecting is not None:  # someone else is connecting: share the result
            return await asyncio.shield(self._connecting)
        self._connecting = asyncio.ensure_future(self._connect())
        try:
            return await asyncio.shield(self._connecting)
        finally:
            self._connecting = None

    def _call(self, proto: _Protocol, args: tuple[bytes, ...]) -> asyncio.Future:
        return proto.call(pack(args))

    def _protocol(self) -> _Protocol:
        return _Protocol(self.timeout)

    async def _ready(self) -> _Protocol:
        """A connection whose handshake completed, made (or awaited) now."""
        try:
            return await self._connection()
        except ReplyError:
            raise  # reachable, but the handshake was refused (wrong password, bad db)
        except (OSError, asyncio.TimeoutError) as exc:
            raise NotSent(f"cannot connect to Redis: {exc!r}") from exc

    async def execute(self, *args: bytes):
        proto = self._proto
        if proto is None or proto.closed:
            proto = await self._ready()
        return await self._call(proto, args)

    async def execute_raw(self, command: bytes):
        """Send one already RESP-encoded command (see scripts.FastScript)."""
        proto = self._proto
        if proto is None or proto.closed:  # (the check inline: no extra coroutine per call)
            proto = await self._ready()
        return await proto.call(command)

    async def ping(self) -> None:
        """PING over the hot-path connection (readiness is decided by the client serving traffic)."""
        await self.execute(b"PING")

    def disconnect(self) -> None:
        """Drop the connection (its pending calls fail with ConnectionError); the next call
        reconnects, to wherever the locator then points."""
        if self._proto is not None:
            self._proto.close()
            self._proto = None

    async def aclose(self) -> None:
        if self._proto is not None:
            self._proto.close()
            self._proto = None
        if self.locator is not None:
            await self.locator.aclose()
