"""Stored /v1/responses responses belong to the AtlasKey that created them.

The upstream stores responses and serves them to anyone who knows the id; the gateway records
``response:<id>`` -> (creating key, tokens it holds) when a response is created, and answers
``GET``/``DELETE /v1/responses/{id}`` (and the sub-paths, e.g. ``/cancel``, ``/input_items``)
and a ``previous_response_id`` only for that key: any other key gets the same 404 as an id
that never existed, and the upstream is never asked. The recorded tokens (the response's input
plus output, as the upstream counted them) bound what a continuation re-feeds the model.
"""

from __future__ import annotations

import asyncio

import aiohttp

from atlas_core import contract

from . import errors, metrics
from .faults import REDIS_FAILURES
from .headers import api_key_from_headers
from .responses import send_error

# method -> the sub-paths of /v1/responses/{id} it may reach; nothing else is forwarded, so no
# path (e.g. one with ../ segments) can reach another upstream route through here
_SUBPATHS = {"GET": ("", "input_items"), "DELETE": ("",), "POST": ("cancel",)}
_ID_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-.")
_FORWARDED = frozenset({b"content-type", b"accept", b"openai-beta"})


def not_found(response_id: str) -> errors.GatewayError:
    return errors.GatewayError(404, f"Response with id '{response_id}' not found.", "invalid_request_error",
                               param="response_id", code="not_found")


async def _owner(rt, response_id: str) -> tuple[str, int] | None:
    try:
        raw = await rt.redis.get(contract.response_owner_key(response_id))
    except REDIS_FAILURES:
        metrics.count_redis_error("response_owner")
        raise errors.redis_unavailable() from None
    return contract.decode_response_owner(raw)


async def tokens_of(rt, principal, response_id: str) -> int:
    """The tokens a response of ``principal``'s key holds; 404 when it is not that key's."""
    owner = await _owner(rt, response_id)
    if owner is None or owner[0] != principal.subjects[0]:
        raise not_found(response_id)
    return owner[1]


async def record(rt, response_id: str, subject: str, tokens: int) -> None:
    try:
        await rt.redis.set(contract.response_owner_key(response_id),
                           contract.encode_response_owner(subject, tokens), ex=contract.RESPONSE_TTL_SECONDS)
    except REDIS_FAILURES:
        metrics.count_redis_error("response_owner")  # the response stays unreachable through Atlas


class StoredResponseEndpoint:
    """``/v1/responses/{id}[/...]``: owner check, then a plain pass-through (requests only)."""

    def __init__(self, gateway, route) -> None:
        self.gateway = gateway
        self.prefix = route.path  # /v1/responses/

    async def __call__(self, scope, receive, send) -> None:
        rt = self.gateway.runtime
        headers = [(b"x-request-id", rt.new_request_id().encode())]
        try:
            await self._handle(rt, scope, receive, send, headers)
        except errors.GatewayError as err:
            await send_error(send, err, headers)

    async def _handle(self, rt, scope, receive, send, headers) -> None:
        method = scope["method"]
        path: str = scope["path"]
        response_id, _, rest = path[len(self.prefix):].partition("/")
        allowed = _SUBPATHS.get(method)
        if allowed is None:
            raise errors.method_not_allowed()
        if rest not in allowed or not response_id or response_id.strip(".") == "" \
                or not _ID_CHARS.issuperset(response_id):
            raise errors.not_found(path)
        principal = await rt.auth.authenticate(api_key_from_headers(scope["headers"]))
        await tokens_of(rt, principal, response_id)
        forward = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"] if k in _FORWARDED}
        if rt.upstream_auth:
            forward["authorization"] = rt.upstream_auth
        url = rt.upstreams.base_for("") + path
        if scope.get("query_string"):
            url += "?" + scope["query_string"].decode("latin-1")
        try:
            async with rt.session.request(method, url, headers=forward) as resp:
                content_type = resp.headers.get("content-type", "application/json").encode("latin-1")
                await send({"type": "http.response.start", "status": resp.status,
                            "headers": [(b"content-type", content_type), *headers]})
                async for chunk in resp.content.iter_any():
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                if method == "DELETE" and resp.status == 200:
                    try:
                        await rt.redis.delete(contract.response_owner_key(response_id))
                    except REDIS_FAILURES:
                        metrics.count_redis_error("response_owner")
        except asyncio.TimeoutError:
            raise errors.upstream_timeout() from None
        except (aiohttp.ClientError, OSError) as exc:
            raise errors.upstream_unreachable(type(exc).__name__) from None
