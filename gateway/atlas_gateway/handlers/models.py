"""``/v1/models``: the upstreams' model lists, merged, filtered by the caller's allowed models."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import aiohttp

from ..http import errors
from ..http.asgi import Headers, Scope, Send, send_json
from .base import ServiceEndpoint

if TYPE_CHECKING:
    from ..runtime import Runtime


class ModelsEndpoint(ServiceEndpoint):
    """The upstreams' model lists, merged and filtered by the key's allowed globs."""

    async def handle(self, rt: Runtime, scope: Scope, send: Send, headers: Headers) -> None:
        principal = await self.principal(rt, scope)
        forward = rt.upstream_headers.stamp({})
        session = rt.session
        assert session is not None  # (Runtime.start opened it)

        async def fetch(base: str) -> list[dict]:
            async with session.get(base + "/v1/models", headers=forward) as resp:
                if resp.status != 200:
                    raise aiohttp.ClientResponseError(resp.request_info, (), status=resp.status)
                doc = await resp.json(content_type=None)
                return list(doc.get("data") or [])

        # one unreachable upstream (of several) must not hide the others' models
        results = await asyncio.gather(*(fetch(b) for b in rt.upstreams.all_bases()), return_exceptions=True)
        lists = [r for r in results if isinstance(r, list)]
        if not lists:
            failure = results[0]
            assert isinstance(failure, BaseException)  # no list came back: every result is an exception
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
