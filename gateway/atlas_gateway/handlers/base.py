"""What the endpoints off the inference hot path share (models.py, usage_report.py, probes.py):
raw ASGI like the hot path, so every response carries x-request-id."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..http import errors
from ..http.asgi import Headers, Receive, Scope, Send, request_id_header, send_error
from ..http.headers import api_key_from_headers

if TYPE_CHECKING:
    from ..app import Gateway
    from ..auth.principal import Principal
    from ..routes import Route
    from ..runtime import Runtime


class ServiceEndpoint:
    """One GET endpoint off the hot path: answers x-request-id and OpenAI-shaped errors; a
    subclass writes :meth:`handle`."""

    def __init__(self, gateway: Gateway, route: Route) -> None:
        self.gateway = gateway
        self.methods = route.methods

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        rt = self.gateway.runtime
        assert rt is not None  # uvicorn serves requests only between the lifespan's startup and shutdown
        headers = [request_id_header(rt.new_request_id())]
        try:
            if scope["method"] not in self.methods:
                raise errors.method_not_allowed()
            await self.handle(rt, scope, send, headers)
        except errors.GatewayError as err:
            await send_error(send, err, headers)

    async def principal(self, rt: Runtime, scope: Scope) -> Principal:
        return await rt.auth.authenticate(api_key_from_headers(scope["headers"]))

    async def handle(self, rt: Runtime, scope: Scope, send: Send, headers: Headers) -> None:  # pragma: no cover
        raise NotImplementedError
