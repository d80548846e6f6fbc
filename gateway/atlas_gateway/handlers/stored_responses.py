"""``/v1/responses/{id}[/...]``: a stored response, for the key that created it only
(auth/response_owners.py): the owner is checked, then the request is passed through (requests
only, nothing metered)."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import aiohttp

from ..http import errors
from ..http.asgi import Headers, Receive, Scope, Send, request_id_header, send_error
from ..http.headers import api_key_from_headers

if TYPE_CHECKING:
    from ..app import Gateway
    from ..routes import Route
    from ..runtime import Runtime

# method -> the sub-paths of /v1/responses/{id} it may reach; nothing else is forwarded, so no
# path (e.g. one with ../ segments) can reach another upstream route through here
_SUBPATHS = {"GET": ("", "input_items"), "DELETE": ("",), "POST": ("cancel",)}
_ID_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-.")
_FORWARDED = frozenset({b"content-type", b"accept", b"openai-beta"})


class StoredResponseEndpoint:
    """``/v1/responses/{id}[/...]``: owner check, then a plain pass-through (requests only)."""

    def __init__(self, gateway: Gateway, route: Route) -> None:
        self.gateway = gateway
        self.prefix = route.path  # /v1/responses/

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        rt = self.gateway.runtime
        assert rt is not None  # uvicorn serves requests only between the lifespan's startup and shutdown
        headers = [request_id_header(rt.new_request_id())]
        try:
            await self._handle(rt, scope, receive, send, headers)
        except errors.GatewayError as err:
            await send_error(send, err, headers)

    async def _handle(self, rt: Runtime, scope: Scope, receive: Receive, send: Send, headers: Headers) -> None:
        method = scope["method"]
        path: str = scope["path"]
        response_id, _, rest = path[len(self.prefix) :].partition("/")
        allowed = _SUBPATHS.get(method)
        if allowed is None:
            raise errors.method_not_allowed()
        if (
            rest not in allowed
            or not response_id
            or response_id.strip(".") == ""
            or not _ID_CHARS.issuperset(response_id)
        ):
            raise errors.not_found(path)
        principal = await rt.auth.authenticate(api_key_from_headers(scope["headers"]))
        await rt.response_owners.tokens_of(principal, response_id)
        forward = rt.upstream_headers.stamp(
            {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"] if k in _FORWARDED}
        )
        url = rt.upstreams.base_for("") + path
        if scope.get("query_string"):
            url += "?" + scope["query_string"].decode("latin-1")
        session = rt.session
        assert session is not None  # (Runtime.start opened it)
        try:
            async with session.request(method, url, headers=forward) as resp:
                content_type = resp.headers.get("content-type", "application/json").encode("latin-1")
                await send(
                    {
                        "type": "http.response.start",
                        "status": resp.status,
                        "headers": [(b"content-type", content_type), *headers],
                    }
                )
                async for chunk in resp.content.iter_any():
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                if method == "DELETE" and resp.status == 200:
                    await rt.response_owners.forget(response_id)
        except asyncio.TimeoutError:
            raise errors.upstream_timeout() from None
        except (aiohttp.ClientError, OSError) as exc:
            raise errors.upstream_unreachable(type(exc).__name__) from None
