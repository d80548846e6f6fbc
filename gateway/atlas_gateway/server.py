"""uvicorn's httptools protocol, with socket writes coalesced per event-loop iteration and
bounds on what a connection may cost before (and while) its request is authenticated.

Bounds (settings.py, enforced here, before any application work):

* open connections per process (``ATLAS_MAX_CONNECTIONS``): one more is answered 503 and closed
  at once; uvicorn's own ``limit_concurrency`` (set to the same number) also answers 503 when
  that many requests are in progress;
* request headers: at most ``ATLAS_MAX_HEADER_BYTES`` (431) and complete within
  ``ATLAS_HEADER_TIMEOUT_SECONDS`` of the connection opening or the request starting (408;
  a connection that never sent a byte is closed). httptools buffers a header until it ends, so
  the raw bytes are counted as they arrive: at most the limit plus one socket read is held;
* the body: complete within ``ATLAS_BODY_TIMEOUT_SECONDS`` of the headers (408);
* idle keep-alive connections: uvicorn's ``timeout_keep_alive`` (``ATLAS_KEEPALIVE_TIMEOUT_SECONDS``);
* an answer sent before the body arrived (401 for an unknown key, 413): the connection is
  half-closed after the answer and dropped shortly after, so a body nobody reads is not
  received for ever.

The timers cost nothing on the common path: the header timer is armed once per connection (and
again only for a request whose headers do not arrive in one read), the body timer only for a
body that does not arrive with its headers.

uvicorn writes a response's status line and headers in one ``transport.write`` and its body in
another, so every non-streaming answer costs two ``send()`` syscalls (on loopback the first
one also pays for waking the client). Buffering the writes issued during one loop iteration
and sending them together at its end (as ``fastredis`` does for Redis commands) makes that
one syscall, without touching what is sent or when the iteration ends.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from .http.errors import error_body

if TYPE_CHECKING:
    from .settings import Settings


@dataclass(frozen=True)
class ConnectionLimits:
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    max_header_bytes: int = 32 * 1024
    max_connections: int = 4096
    linger: float = 2.0  # how long an answered connection may still deliver an unread body

    @classmethod
    def from_settings(cls, settings: Settings) -> "ConnectionLimits":
        return cls(settings.header_timeout, settings.body_timeout, settings.max_header_bytes, settings.max_connections)


def _error_response(status: int, message: str, code: str) -> bytes:
    """A whole HTTP response (the connection is closed after it), with the one error body."""
    body = error_body(message, "invalid_request_error", code)
    return b"".join(
        [
            STATUS_LINE[status],
            b"content-type: application/json\r\n",
            b"content-length: %d\r\n" % len(body),
            b"connection: close\r\n\r\n",
            body,
        ]
    )


_TOO_MANY = _error_response(
    503, "Too many open connections to this gateway process; retry later.", "too_many_connections"
)
_HEADERS_TOO_LARGE = _error_response(431, "Request headers too large.", "request_header_fields_too_large")
_HEADER_TIMEOUT = _error_response(408, "The request headers did not arrive in time.", "request_timeout")
_BODY_TIMEOUT = _error_response(408, "The request body did not arrive in time.", "request_timeout")

# where the current request is
_HEADERS, _BODY, _DONE = 0, 1, 2


class _CoalescingTransport:
    """Wraps a transport: ``write`` buffers until the end of the loop iteration; everything else
    (and any write after ``close``) goes straight to the real transport, flushed first."""

    __slots__ = ("_transport", "_loop", "_pending")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes] = []

    def write(self, data: bytes) -> None:
        if not data:
            return
        if not self._pending:
            self._loop.call_soon(self.flush)
        self._pending.append(data)

    def flush(self) -> None:
        pending = self._pending
        if pending:
            self._pending = []
            if not self._transport.is_closing():
                self._transport.write(pending[0] if len(pending) == 1 else b"".join(pending))

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def write_eof(self) -> None:
        self.flush()
        self._transport.write_eof()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class CoalescingHttpToolsProtocol(HttpToolsProtocol):
    limits = ConnectionLimits()  # set for the process by configure()

    _phase = _HEADERS
    _header_bytes = 0
    _timer: asyncio.TimerHandle | None = None
    _lingering = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(_CoalescingTransport(transport, self.loop))  # type: ignore[arg-type]
        if len(self.connections) > self.limits.max_connections:
            self._refuse(_TOO_MANY)
            return
        self._timer = self.loop.call_later(self.limits.header_timeout, self._timed_out)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._lingering:
            return  # answered already: the rest of an unread body is dropped unparsed
        if self._phase != _BODY:
            self._header_bytes += len(data)
        super().data_received(data)
        phase = self._phase
        if phase == _HEADERS:
            if self._header_bytes > self.limits.max_header_bytes:
                self._refuse(_HEADERS_TOO_LARGE)
            elif self._timer is None:
                self._timer = self.loop.call_later(self.limits.header_timeout, self._timed_out)
        elif phase == _BODY and self._timer is None:
            self._timer = self.loop.call_later(self.limits.body_timeout, self._timed_out)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._phase = _HEADERS

    def on_headers_complete(self) -> None:
        self._cancel_timer()
        self._phase = _BODY
        self._header_bytes = 0
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._cancel_timer()
        self._phase = _DONE
        super().on_message_complete()

    def on_response_complete(self) -> None:
        unread = self._phase == _BODY and not self.pipeline  # this response's body never arrived
        super().on_response_complete()
        if unread and not self.transport.is_closing():
            # answered before the body arrived: say so with a FIN, then let go of the connection
            self._lingering = True
            self._cancel_timer()
            self._unset_keepalive_if_required()
            try:
                self.transport.write_eof()
            except (OSError, RuntimeError, NotImplementedError):
                self.transport.close()
                return
            self._timer = self.loop.call_later(self.limits.linger, self.transport.close)

    def _timed_out(self) -> None:
        self._timer = None
        if self.transport.is_closing():
            return
        cycle = self.cycle
        if self._phase == _BODY:
            if cycle is not None and not cycle.response_started:
                self._refuse(_BODY_TIMEOUT)
            else:
                self.transport.close()
            if cycle is not None:  # the application's receive() now returns http.disconnect
                cycle.disconnected = True
                cycle.message_event.set()
        elif self._phase == _HEADERS:
            # a connection that never sent a byte is just closed; a request cut short gets a 408
            self._refuse(_HEADER_TIMEOUT if self._header_bytes else b"")

    def _refuse(self, response: bytes) -> None:
        self._cancel_timer()
        if response:
            self.transport.write(response)
        self.transport.close()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


def configure(settings: Settings) -> None:
    """Set this process's connection bounds (called where the app is built, in every worker)."""
    CoalescingHttpToolsProtocol.limits = ConnectionLimits.from_settings(settings)
