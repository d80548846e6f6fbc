"""Stored /v1/responses responses belong to the AtlasKey that created them.

The upstream stores responses and serves them to anyone who knows the id; the gateway records
``response:<id>`` -> (creating key, tokens it holds) when a response is created, and lets only
that key reach it again (``GET``/``DELETE /v1/responses/{id}``, a ``previous_response_id``): any
other key gets the same 404 as an id that never existed, and the upstream is never asked. The
recorded tokens (the response's input plus output, as the upstream counted them) bound what a
continuation re-feeds the model.
"""

from __future__ import annotations

from typing import Any

from atlas_core import contract

from .. import metrics
from ..http import errors
from ..store.failures import REDIS_FAILURES
from .principal import Principal


class ResponseOwners:
    """The owner records, in Redis (redis-py: idempotent commands only)."""

    def __init__(self, redis: Any) -> None:
        self.redis = redis

    async def tokens_of(self, principal: Principal, response_id: str) -> int:
        """The tokens a response of ``principal``'s key holds; 404 when it is not that key's."""
        try:
            raw = await self.redis.get(contract.response_owner_key(response_id))
        except REDIS_FAILURES:
            metrics.count_redis_error("response_owner")
            raise errors.redis_unavailable() from None
        owner = contract.decode_response_owner(raw)
        if owner is None or owner[0] != principal.subjects[0]:
            raise errors.response_not_found(response_id)
        return owner[1]

    async def record(self, response_id: str, subject: str, tokens: int) -> None:
        try:
            await self.redis.set(
                contract.response_owner_key(response_id),
                contract.encode_response_owner(subject, tokens),
                ex=contract.RESPONSE_TTL_SECONDS,
            )
        except REDIS_FAILURES:
            metrics.count_redis_error("response_owner")  # the response stays unreachable through Atlas

    async def forget(self, response_id: str) -> None:
        """The upstream deleted the response."""
        try:
            await self.redis.delete(contract.response_owner_key(response_id))
        except REDIS_FAILURES:
            metrics.count_redis_error("response_owner")
