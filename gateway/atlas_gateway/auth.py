"""Who is calling, decided in one place for every endpoint: the key presented -> its config as a
:class:`Principal` (:class:`ConfigCache`) -> whether it may be served right now
(:class:`Authenticator`, one clock).

The cache keeps each answer (including "unknown key") for ``ATLAS_CONFIG_TTL_SECONDS``
(default 1 s), so a key the operator deletes is refused within about two seconds while the
common path costs no Redis round trip. Concurrent misses for one key share one lookup. When
Redis is unreachable, fail-open mode may use the last known (stale) entry.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Callable

from atlas_core import contract
from atlas_core.contract import hash_api_key

from . import calls, errors, metrics
from .faults import REDIS_FAILURES, is_transport_failure, reply_error
from .globs import compile_globs

MISSING_KEY = "Missing API key: send 'Authorization: Bearer <key>' or 'x-api-key'."


class Principal:
    """Everything the hot path needs about one key, precomputed when the config is loaded."""

    __slots__ = (
        "key", "quota", "quota_missing", "ref", "subjects", "limit_args", "settle_args",
        "allows_model", "priority", "leased", "call_shapes", "refresh_call",
        "price_tables", "cost_limited", "priced", "currency", "tag",
    )

    def __init__(self, key: contract.KeyConfig, quota: contract.QuotaConfig | None) -> None:
        self.key = key
        self.quota = quota
        self.quota_missing = bool(key.quota) and quota is None
        self.ref = key.ref
        # one hash tag for every counter of this key and of its quota: one cluster slot per call
        self.tag = contract.slot_tag(key.namespace, key.name, key.quota)
        subjects = [(contract.key_subject(key.namespace, key.name), key.limits, key.shortfall)]
        tables = [key.price_list]
        if quota is not None:
            subjects.append((contract.quota_subject(quota.namespace, quota.name), quota.limits, quota.shortfall))
            tables.append(quota.price_list)
        # per subject: its resolved price list (or None) and whether it has a cost budget
        self.price_tables = tuple(tables)
        self.cost_limited = tuple(lim.cost_limited for _, lim, _ in subjects)
        self.priced = any(t is not None for t in tables)
        self.currency = key.price_list.currency if key.price_list is not None else None
        self.subjects = tuple(s for s, _, _ in subjects)
        # the per-subject script arguments (calls.py), fixed for as long as this config holds
        self.limit_args = tuple(arg for _, lim, short in subjects for arg in calls.limit_args(lim, short))
        self.settle_args = tuple(arg for _, lim, _ in subjects for arg in calls.settle_limit_args(lim))
        # some subject holds a lease per request (admit.lua: maxConcurrent or a day/month budget)
        self.leased = any(lim.max_concurrent or lim.tokens_per_day or lim.tokens_per_month or lim.cost_limited
                          for _, lim, _ in subjects)
        self.allows_model = compile_globs(tuple(key.models))
        self.priority = key.priority if key.priority in contract.PRIORITIES else contract.DEFAULT_PRIORITY
        # calls.ScriptCalls' caches: (day, admit shape, settle shape) and the refresh shape
        self.call_shapes: tuple | None = None
        self.refresh_call = None

    def refusal(self, now: float) -> errors.GatewayError | None:
        """Why this key may not be served right now (403), or None."""
        key = self.key
        if key.refusal:
            return errors.permission_denied(
                f"API key {key.ref} is not usable: {key.refusal_message or key.refusal}", key.refusal
            )
        if key.suspended:
            return errors.permission_denied(f"API key {key.ref} is suspended.", "Suspended")
        if key.expires_at is not None and now >= key.expires_at:
            return errors.permission_denied(f"API key {key.ref} has expired.", "Expired")
        if self.quota_missing:
            return errors.permission_denied(
                f"API key {key.ref} refers to AtlasQuota {key.quota!r}, which does not exist.",
                "QuotaNotFound",
            )
        quota = self.quota
        if quota is not None and quota.refusal:
            return errors.permission_denied(
                f"API key {key.ref} is not usable: AtlasQuota {quota.name!r}: "
                f"{quota.refusal_message or quota.refusal}", quota.refusal)
        return None

    def prices_for(self, model: str) -> tuple["contract.Price | None", ...] | None:
        """Per subject, the price of ``model`` (None: unpriced subject); None when no subject
        is priced at all (the common case: no cost work). Raises the 403 for a cost-limited
        subject whose price list has no price for ``model`` and no default."""
        if not self.priced:
            return None
        out = []
        for subject, table, limited in zip(self.subjects, self.price_tables, self.cost_limited):
            price = table.price_of(model) if table is not None else None
            if price is None and limited:
                owner = ("AtlasQuota " if subject.startswith("q:") else "AtlasKey ") + subject[2:]
                listed = f"AtlasPriceList {table.name!r}" if table is not None else "no AtlasPriceList"
                raise errors.permission_denied(
                    f"{owner} has a cost budget, but {listed} has no price for model '{model}' "
                    "(and no default): the request cannot be priced.", "model_not_priced")
            out.append(price)
        return tuple(out)


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


class Authenticator:
    """The key a request presents -> the :class:`Principal` it may be served as, or the
    :class:`~atlas_gateway.errors.GatewayError` refusing it: 401 (no key, unknown key), 403 (not
    usable now: suspended, expired, refused by the operator, quota missing), 503/500 (Redis
    unreachable / refusing, subject to the fail mode). ``clock`` (wall time, seconds) is the one
    clock ``expiresAt`` is compared with.

    The hot path calls the three steps apart (it checks the declared body size between the
    first two, and labels a 403 with the key); every other endpoint calls :meth:`authenticate`."""

    def __init__(self, cache: ConfigCache, redis_health: Any, fail_open: bool,
                 clock: Callable[[], float] = time.time) -> None:
        self.cache = cache
        self.redis_health = redis_health  # runtime.RedisHealth: fail-open logging
        self.fail_open = fail_open
        self.clock = clock

    @staticmethod
    def presented(api_key: str | None) -> str:
        """The key the request presents (headers.RequestHeaders); 401 when it presents none."""
        if api_key is None:
            raise errors.invalid_api_key(MISSING_KEY)
        return api_key

    async def identify(self, api_key: str) -> Principal:
        """The key's Principal; 401 for an unknown key. Only its hash is looked up."""
        key_hash = hash_api_key(api_key)
        try:
            principal = await self.cache.lookup(key_hash)
        except REDIS_FAILURES as exc:
            if not is_transport_failure(exc):
                raise reply_error("config", exc) from None
            metrics.count_redis_error("config")
            self.redis_health.failed(self.fail_open, exc)
            principal = self.cache.stale(key_hash) if self.fail_open else None
            if principal is None:
                raise errors.redis_unavailable() from None
        if principal is None:
            raise errors.invalid_api_key("Incorrect API key provided.")
        return principal

    def check_usable(self, principal: Principal) -> None:
        """403 when ``principal`` may not be served now (checked on every request)."""
        refusal = principal.refusal(self.clock())
        if refusal is not None:
            raise refusal

    async def authenticate(self, api_key: str | None) -> Principal:
        """All three steps: the Principal a usable key is served as."""
        principal = await self.identify(self.presented(api_key))
        self.check_usable(principal)
        return principal
