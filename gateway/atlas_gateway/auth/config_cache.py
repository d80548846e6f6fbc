"""key hash -> :class:`Principal` (or None: unknown key), cached in-process.

The cache keeps each answer (including "unknown key") for ``ATLAS_CONFIG_TTL_SECONDS``
(default 1 s), so a key the operator deletes is refused within about two seconds while the
common path costs no Redis round trip. Concurrent misses for one key share one lookup. When
Redis is unreachable, fail-open mode may use the last known (stale) entry.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from atlas_core import contract

from .principal import Principal


class ConfigCache:
    """key hash -> Principal (or None = unknown key), each answer kept ``ttl`` seconds."""

    def __init__(self, redis: Any, ttl: float = 1.0, max_entries: int = 100_000) -> None:
        self.redis = redis
        self.ttl = ttl
        self.max_entries = max_entries
        self._entries: dict[str, tuple[float, Principal | None]] = {}
        self._inflight: dict[str, asyncio.Future[Principal | None]] = {}

    async def lookup(self, key_hash: str) -> Principal | None:
        entry = self._entries.get(key_hash)
        if entry is not None and entry[0] > time.monotonic():
            return entry[1]
        pending = self._inflight.get(key_hash)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[Principal | None] = asyncio.get_running_loop().create_future()
        self._inflight[key_hash] = future
        try:
            principal = await self._load(key_hash)
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # mark retrieved: waiters (if any) re-raise it themselves
            raise
        else:
            future.set_result(principal)
            if len(self._entries) >= self.max_entries:
                self._entries.clear()  # a flood of random keys must not grow memory without bound
            self._entries[key_hash] = (time.monotonic() + self.ttl, principal)
            return principal
        finally:
            del self._inflight[key_hash]

    def stale(self, key_hash: str) -> Principal | None:
        """The last known answer, however old (fail-open mode while Redis is unreachable)."""
        entry = self._entries.get(key_hash)
        return entry[1] if entry is not None else None

    async def _load(self, key_hash: str) -> Principal | None:
        raw = await self.redis.get(contract.key_config_key(key_hash))
        if raw is None:
            return None
        key = contract.KeyConfig.decode(raw)
        quota = None
        if key.quota:
            raw_quota = await self.redis.get(contract.quota_config_key(key.namespace, key.quota))
            if raw_quota is not None:
                quota = contract.QuotaConfig.decode(raw_quota)
        return Principal(key, quota)
