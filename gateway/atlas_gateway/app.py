"""The ASGI application.

``create_app()`` returns a FastAPI app with every endpoint registered (so the OpenAPI-free
FastAPI tooling, lifespan and any later non-hot endpoints work as usual), wrapped in a tiny
dispatcher that sends the fixed hot paths straight to their raw ASGI endpoints: FastAPI's
middleware stack and routing would otherwise cost about as much as the proxying itself.
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.routing import Route

from . import errors
from .responses import send_error
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


def build_fastapi(gateway: Gateway) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await gateway.start()
        try:
            yield
        finally:
            await gateway.stop()

    app = FastAPI(title="Atlas gateway", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    for route in ROUTES:
        if not route.prefix:
            app.router.routes.append(Route(route.path, gateway.routes[route.path], methods=list(route.methods)))
    app.state.gateway = gateway
    return app


class AtlasASGI:
    """Dispatcher: known paths go straight to their endpoint; every other path is an
    OpenAI-shaped 404 that never reaches the upstream (FastAPI only runs the lifespan)."""

    def __init__(self, gateway: Gateway, fastapi_app: FastAPI) -> None:
        self.gateway = gateway
        self.fastapi = fastapi_app
        self.routes = gateway.routes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            endpoint = self.routes.get(scope["path"])
            if endpoint is not None:
                await endpoint(scope, receive, send)
                return
            for prefix, endpoint in self.gateway.prefixes:
                if scope["path"].startswith(prefix):
                    await endpoint(scope, receive, send)
                    return
            runtime = self.gateway.runtime
            request_id = runtime.new_request_id().encode() if runtime else b"-"
            await send_error(send, errors.not_found(scope["path"]), [(b"x-request-id", request_id)])
            return
        await self.fastapi(scope, receive, send)


def create_app(settings: Settings | None = None) -> AtlasASGI:
    settings = settings or Settings.from_env()
    configure_connections(settings)
    gateway = Gateway(settings)
    return AtlasASGI(gateway, build_fastapi(gateway))
