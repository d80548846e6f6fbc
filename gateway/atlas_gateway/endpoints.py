"""The endpoints that are not on the inference hot path: /v1/models, /v1/usage, /healthz,
/readyz and /metrics. Raw ASGI like the hot path, so every response carries x-request-id."""

from __future__ import annotations

import asyncio
from datetime import datetime, timezone

import aiohttp

from atlas_core import contract

from . import errors, metrics
from .headers import api_key_from_headers
from .faults import REDIS_FAILURES, is_transport_failure, reply_error, reply_kind
from .responses import send_bytes, send_error, send_json
from .runtime import Runtime


class _Endpoint:
    def __init__(self, gateway, route) -> None:
        self.gateway = gateway
        self.methods = route.methods

    async def __call__(self, scope, receive, send) -> None:
        rt: Runtime = self.gateway.runtime
        headers = [(b"x-request-id", rt.new_request_id().encode())]
        try:
            if scope["method"] not in self.methods:
                raise errors.method_not_allowed()
            await self.handle(rt, scope, send, headers)
        except errors.GatewayError as err:
            await send_error(send, err, headers)

    async def principal(self, rt: Runtime, scope):
        return await rt.auth.authenticate(api_key_from_headers(scope["headers"]))

    async def handle(self, rt: Runtime, scope, send, headers) -> None:  # pragma: no cover
        raise NotImplementedError


class ModelsEndpoint(_Endpoint):
    """The upstreams' model lists, merged and filtered by the key's allowed globs."""

    async def handle(self, rt, scope, send, headers) -> None:
        principal = await self.principal(rt, scope)
        forward = {"authorization": rt.upstream_auth} if rt.upstream_auth else {}

        async def fetch(base: str) -> list[dict]:
            async with rt.session.get(base + "/v1/models", headers=forward) as resp:
                if resp.status != 200:
                    raise aiohttp.ClientResponseError(resp.request_info, (), status=resp.status)
                doc = await resp.json(content_type=None)
                return list(doc.get("data") or [])

        # one unreachable upstream (of several) must not hide the others' models
        results = await asyncio.gather(*(fetch(b) for b in rt.upstreams.all_bases()), return_exceptions=True)
        lists = [r for r in results if isinstance(r, list)]
        if not lists:
            failure = results[0]
            if isinstance(failure, asyncio.TimeoutError):
                raise errors.upstream_timeout()
            if isinstance(failure, (aiohttp.ClientError, ValueError)):
                raise errors.upstream_unreachable(type(failure).__name__)
            raise failure
        seen: set[str] = set()
        data = []
        for models in lists:
            for model in models:
                model_id = model.get("id")
                if isinstance(model_id, str) and model_id not in seen and principal.allows_model(model_id):
                    seen.add(model_id)
                    data.append(model)
        await send_json(send, 200, {"object": "list", "data": data}, headers)


def _remaining(limits: contract.Limits, usage: contract.Usage) -> dict:
    def left(limit, used):
        return None if limit is None else max(0, limit - used)

    out = {
        "tokensToday": left(limits.tokens_per_day, usage.tokens_today),
        "tokensThisMonth": left(limits.tokens_per_month, usage.tokens_this_month),
    }
    if limits.cost_limited:  # decimal strings, like status.usage.costToday
        def cost_left(limit, used):
            return None if limit is None else contract.format_micro(max(0, contract.to_micro(limit) - (used or 0)))

        out["costToday"] = cost_left(limits.cost_per_day, usage.cost_today)
        out["costThisMonth"] = cost_left(limits.cost_per_month, usage.cost_this_month)
    return out


def _price_list(table: contract.PriceTable | None) -> dict | None:
    return None if table is None else {"name": table.name, "currency": table.currency}


class UsageEndpoint(_Endpoint):
    """The caller's own settled usage, limits and what is left, and the same for its quota."""

    async def handle(self, rt, scope, send, headers) -> None:
        principal = await self.principal(rt, scope)
        now = datetime.now(timezone.utc)
        try:
            usages = await contract.read_usages(rt.redis, principal.subjects, now,
                                                dict.fromkeys(principal.subjects, principal.tag))
        except REDIS_FAILURES as exc:
            if not is_transport_failure(exc):
                raise reply_error("usage", exc) from None
            metrics.count_redis_error("usage")
            raise errors.redis_unavailable() from None
        key = principal.key
        key_usage = usages[principal.subjects[0]]
        doc = {
            "key": {"namespace": key.namespace, "name": key.name, "keyId": key.key_id},
            "usage": key_usage.to_status(priced=key.price_list is not None),
            "limits": key.limits.to_spec(),
            "remaining": _remaining(key.limits, key_usage),
            "quota": None,
        }
        if key.price_list is not None:
            doc["priceList"] = _price_list(key.price_list)
        if principal.quota is not None:
            quota_usage = usages[principal.subjects[1]]
            doc["quota"] = {
                "name": principal.quota.name,
                "usage": quota_usage.to_status(priced=principal.quota.price_list is not None),
                "limits": principal.quota.limits.to_spec(),
                "remaining": _remaining(principal.quota.limits, quota_usage),
            }
            if principal.quota.price_list is not None:
                doc["quota"]["priceList"] = _price_list(principal.quota.price_list)
        await send_json(send, 200, doc, headers)


class HealthEndpoint(_Endpoint):
    async def handle(self, rt, scope, send, headers) -> None:
        await send_bytes(send, 200, b"ok\n", headers, b"text/plain; charset=utf-8")


class ReadyEndpoint(_Endpoint):
    """Ready when the hot-path Redis client (the one serving admissions) answers a PING; an
    error reply (NOAUTH, a wrong database...) is as unready as no connection at all."""

    async def handle(self, rt, scope, send, headers) -> None:
        try:
            await rt.fast_redis.ping()
        except REDIS_FAILURES as exc:
            if is_transport_failure(exc):
                metrics.count_redis_error("ping")
                body = b"redis unreachable\n"
            else:
                metrics.count_redis_reply_error("ping", reply_kind(exc))
                body = f"redis refused: {reply_kind(exc)}\n".encode()
            await send_bytes(send, 503, body, headers, b"text/plain; charset=utf-8")
            return
        await send_bytes(send, 200, b"ready\n", headers, b"text/plain; charset=utf-8")


class MetricsEndpoint(_Endpoint):
    async def handle(self, rt, scope, send, headers) -> None:
        body, content_type = metrics.render()
        await send_bytes(send, 200, body, headers, content_type.encode())
