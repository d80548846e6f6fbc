"""The ASGI application: every HTTP request dispatched by the route table (routes.py) to its
endpoint, the lifespan that starts and stops the process's runtime, and nothing else.

No framework: the endpoints are raw ASGI callables and the lifespan is the ASGI protocol's few
messages; what a framework would cost here is measured in docs/benchmarks.md and the choice
explained in docs/gateway.md ("Why no framework").
"""

from __future__ import annotations

import logging
import traceback

from .http import errors
from .http.asgi import Receive, Scope, Send, request_id_header, send_error
from .routes import ROUTES
from .runtime import Runtime
from .server import configure as configure_connections
from .settings import Settings

log = logging.getLogger("atlas_gateway")


class Gateway:
    """Owns the runtime; endpoints read ``gateway.runtime`` at call time."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.runtime: Runtime | None = None
        # the route table's endpoints, one per route: exact paths, then path prefixes
        self.routes = {route.path: route.handler(self, route) for route in ROUTES if not route.prefix}
        self.prefixes = tuple((route.path, route.handler(self, route)) for route in ROUTES if route.prefix)

    async def start(self) -> None:
        self.runtime = Runtime(self.settings)
        await self.runtime.start()

    async def stop(self) -> None:
        if self.runtime is not None:
            await self.runtime.stop()
            self.runtime = None


class AtlasASGI:
    """Known paths go straight to their endpoint; every other path is an OpenAI-shaped 404 that
    never reaches the upstream."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.routes = gateway.routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            endpoint = self.routes.get(scope["path"])
            if endpoint is not None:
                await endpoint(scope, receive, send)
                return
            for prefix, endpoint in self.gateway.prefixes:
                if scope["path"].startswith(prefix):
                    await endpoint(scope, receive, send)
                    return
            runtime = self.gateway.runtime
            request_id = runtime.new_request_id() if runtime is not None else "-"
            await send_error(send, errors.not_found(scope["path"]), [request_id_header(request_id)])
        elif kind == "lifespan":
            await self.lifespan(receive, send)
        elif kind == "websocket":  # no route takes a WebSocket: refused at the handshake (403)
            await send({"type": "websocket.close"})

    async def lifespan(self, receive: Receive, send: Send) -> None:
        """The ASGI lifespan protocol: start the runtime on ``lifespan.startup``, stop it on
        ``lifespan.shutdown``; a failure is reported to the server (which then exits)."""
        started = False
        await receive()  # lifespan.startup
        try:
            await self.gateway.start()
            try:
                await send({"type": "lifespan.startup.complete"})
                started = True
                await receive()  # lifespan.shutdown
            finally:
                await self.gateway.stop()
        except BaseException:
            failed = "lifespan.shutdown.failed" if started else "lifespan.startup.failed"
            await send({"type": failed, "message": traceback.format_exc()})
            raise
        await send({"type": "lifespan.shutdown.complete"})


def create_app(settings: Settings | None = None) -> AtlasASGI:
    settings = settings or Settings.from_env()
    configure_connections(settings)
    return AtlasASGI(Gateway(settings))
