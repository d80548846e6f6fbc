"""The ASGI application without a framework: the lifespan protocol, dispatch by the route table,
the 404 for every other path, and no WebSocket."""

from __future__ import annotations

import asyncio
import json

import pytest

from atlas_gateway.app import create_app
from atlas_gateway.routes import ROUTES
from atlas_gateway.settings import Settings

# nothing listens there: the lifespan must not need Redis to start or stop
SETTINGS = Settings(
    upstream_url="http://127.0.0.1:9", redis_url="redis://127.0.0.1:9/0", redis_cluster="false", gc_threshold=0
)


class Channel:
    """The server's side of one ASGI scope: messages in, messages out."""

    def __init__(self, *incoming: dict) -> None:
        self.incoming: asyncio.Queue = asyncio.Queue()
        for message in incoming:
            self.incoming.put_nowait(message)
        self.sent: list[dict] = []
        self.answered = asyncio.Event()

    async def receive(self) -> dict:
        return await self.incoming.get()

    async def send(self, message: dict) -> None:
        self.sent.append(message)
        self.answered.set()


async def test_lifespan_starts_and_stops_the_runtime():
    app = create_app(SETTINGS)
    channel = Channel({"type": "lifespan.startup"})
    task = asyncio.ensure_future(app({"type": "lifespan"}, channel.receive, channel.send))
    await asyncio.wait_for(channel.answered.wait(), 10)
    assert channel.sent == [{"type": "lifespan.startup.complete"}]
    assert app.gateway.runtime is not None and app.gateway.runtime.session is not None
    channel.incoming.put_nowait({"type": "lifespan.shutdown"})
    await asyncio.wait_for(task, 10)
    assert channel.sent[-1] == {"type": "lifespan.shutdown.complete"}
    assert app.gateway.runtime is None


async def test_a_failed_start_is_reported_to_the_server():
    app = create_app(SETTINGS)

    async def broken() -> None:
        raise RuntimeError("no runtime today")

    app.gateway.start = broken
    channel = Channel({"type": "lifespan.startup"})
    with pytest.raises(RuntimeError):
        await app({"type": "lifespan"}, channel.receive, channel.send)
    (message,) = channel.sent
    assert message["type"] == "lifespan.startup.failed" and "no runtime today" in message["message"]


async def test_every_route_of_the_table_is_dispatched_and_nothing_else():
    app = create_app(SETTINGS)
    seen = []

    class Probe:
        def __init__(self, path: str) -> None:
            self.path = path

        async def __call__(self, scope, receive, send) -> None:
            seen.append(self.path)

    app.routes.update({path: Probe(path) for path in app.routes})
    app.gateway.prefixes = tuple((prefix, Probe(prefix)) for prefix, _ in app.gateway.prefixes)
    for route in ROUTES:
        path = route.path + ("resp_1" if route.prefix else "")
        await app({"type": "http", "path": path, "method": route.methods[0], "headers": []}, None, None)
    assert seen == [route.path for route in ROUTES]

    channel = Channel()
    await app({"type": "http", "path": "/v1/files", "method": "POST", "headers": []}, channel.receive, channel.send)
    start, body = channel.sent
    assert start["status"] == 404 and (b"x-request-id", b"-") in start["headers"]  # no runtime yet
    assert json.loads(body["body"])["error"]["code"] == "unknown_url"


async def test_a_websocket_is_refused():
    channel = Channel({"type": "websocket.connect"})
    await create_app(SETTINGS)({"type": "websocket", "path": "/v1/chat/completions"}, channel.receive, channel.send)
    assert channel.sent == [{"type": "websocket.close"}]
