"""Server-sent-events pass-through: complete events are forwarded as soon as they arrive (one
ASGI send per network read that completes at least one event); what they carry is read by
metering/events.py."""

from __future__ import annotations

import asyncio

import aiohttp

from ..http.asgi import Send
from ..metering.events import StreamState, error_event, filter_events


async def pump(resp: aiohttp.ClientResponse, send: Send, state: StreamState, strip_usage: bool) -> None:
    """Copy ``resp``'s event stream to the client until it ends, breaks, or we are cancelled.

    A broken upstream (connection lost, truncated body, read timeout) is recorded in
    ``state.error`` and reported to the client as a final error event; cancellation (the
    client went away) propagates to the caller.
    """
    buf = b""
    try:
        async for chunk in resp.content.iter_any():
            buf = buf + chunk if buf else chunk
            if b"\r" in buf:
                buf = buf.replace(b"\r\n", b"\n")
            end = buf.rfind(b"\n\n")
            if end < 0:
                continue
            block, buf = buf[: end + 2], buf[end + 2 :]
            out = filter_events(block, state, strip_usage)
            if out:
                await send({"type": "http.response.body", "body": out, "more_body": True})
    except asyncio.TimeoutError:
        state.error = "timeout"
    except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError):
        state.error = "disconnected"
    if state.error is None and buf.strip():
        out = filter_events(buf.rstrip(b"\n") + b"\n\n", state, strip_usage)
        if out:
            await send({"type": "http.response.body", "body": out, "more_body": True})
    if state.error == "timeout":
        await send(
            {
                "type": "http.response.body",
                "more_body": True,
                "body": error_event("The upstream timed out mid-stream.", "upstream_timeout"),
            }
        )
    elif state.error == "disconnected":
        await send(
            {
                "type": "http.response.body",
                "more_body": True,
                "body": error_event("The upstream connection was lost mid-stream.", "upstream_disconnected"),
            }
        )
