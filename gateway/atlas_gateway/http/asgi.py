"""Raw ASGI response helpers for the hot path (no framework objects per request)."""

from __future__ import annotations

import json
from typing import Any, Awaitable, Callable

from .errors import GatewayError

# ASGI's callables and scope, and the response headers every answer carries
Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
Headers = list[tuple[bytes, bytes]]

JSON = b"application/json"


def request_id_header(request_id: str) -> tuple[bytes, bytes]:
    """``x-request-id``: on every response of every endpoint (the id comes from the runtime)."""
    return (b"x-request-id", request_id.encode())


async def send_bytes(
    send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]], content_type: bytes = JSON
) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", content_type), (b"content-length", str(len(body)).encode()), *headers],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def send_json(send: Send, status: int, doc: Any, headers: list[tuple[bytes, bytes]]) -> None:
    await send_bytes(send, status, json.dumps(doc, separators=(",", ":")).encode(), headers)


async def send_error(send: Send, err: GatewayError, headers: list[tuple[bytes, bytes]]) -> None:
    await send_bytes(send, err.status, err.body(), headers + err.headers)


async def read_body(receive: Callable[[], Awaitable[dict[str, Any]]], limit: int) -> bytes | None:
    """The whole request body, or None once it exceeds ``limit`` bytes (the caller answers 413)."""
    msg = await receive()
    body = msg.get("body", b"")
    if not msg.get("more_body", False):
        return body if len(body) <= limit else None
    parts = [body]
    size = len(body)
    while True:
        if size > limit:
            return None
        msg = await receive()
        if msg["type"] == "http.disconnect":
            raise ConnectionAbortedError("client went away while sending the body")
        chunk = msg.get("body", b"")
        parts.append(chunk)
        size += len(chunk)
        if not msg.get("more_body", False):
            return b"".join(parts) if size <= limit else None
