"""uvicorn's httptools protocol with its socket writes coalesced per event-loop iteration.

uvicorn writes a response's status line and headers in one ``transport.write`` and its body in
another, so every non-streaming answer costs two ``send()`` syscalls (on loopback the first
one also pays for waking the client). Buffering the writes issued during one loop iteration
and sending them together at its end (as ``fastredis`` does for Redis commands) makes that
one syscall, without touching what is sent or when the iteration ends.
"""

from __future__ import annotations

import asyncio

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


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

    def __getattr__(self, name: str):
        return getattr(self._transport, name)


class CoalescingHttpToolsProtocol(HttpToolsProtocol):
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(_CoalescingTransport(transport, self.loop))  # type: ignore[arg-type]
