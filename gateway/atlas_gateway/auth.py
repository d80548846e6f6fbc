"""Who is calling: API key extraction, SHA-256, and an in-process cache of key/quota config.

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

from . import errors
from .globs import compile_globs

_BEARER = b"bearer "


def api_key_from_headers(headers: list[tuple[bytes, bytes]]) -> str | None:
    """The key from ``Authorization: Bearer <key>`` or ``x-api-key: <key>`` (raw ASGI headers)."""
    fallback = None
    for name, value in headers:
        if name == b"authorization":
            if value[:7].lower() == _BEARER:
                key = value[7:].strip()
                if key:
                    return key.decode("latin-1")
        elif name == b"x-api-key":
            key = value.strip()
            if key:
                fallback = key.decode("latin-1")
    return fallback


class Principal:
    """Everything the hot path needs about one key, precomputed when the config is loaded."""

    __slots__ = (
        "key", "quota", "quota_missing", "ref", "subjects", "subject_count", "limit_args", "tpm_args",
        "allows_model", "priority", "encoded", "leased", "lease_keys", "_keys_day", "_admit_keys", "_settle_keys",
        "price_tables", "cost_limited", "priced", "currency", "tag",
    )

    def __init__(self, key: contract.KeyConfig, quota: contract.QuotaConfig | None) -> None:
        self.key = key
        self.quota = quota
        self.quota_missing = bool(key.quota) and quota is None
        self.ref = key.ref
        # one hash tag for every counter of this key and of its quota: one cluster slot per call
        self.tag = tag = contract.slot_tag(key.namespace, key.name, key.quota)
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
        self.subject_count = str(len(subjects)).encode()
        args: list[bytes] = []
        tpm: list[bytes] = []
        for _, limits, shortfall in subjects:
            args += [
                _num(limits.requests_per_second),
                _num(limits.effective_burst),
                _num(limits.tokens_per_minute),
                _num(limits.tokens_per_day),
                _num(limits.tokens_per_month),
                _num(limits.max_concurrent),
                b"1" if shortfall.shrink else b"0",
                _num(shortfall.min_completion_tokens),
                _micro(limits.cost_per_day),
                _micro(limits.cost_per_month),
            ]
            tpm += [_num(limits.tokens_per_minute), b"1" if limits.cost_limited else b"0"]
        self.limit_args = tuple(args)
        # some subject holds a lease per request (admit.lua: maxConcurrent or a day/month budget)
        self.leased = any(lim.max_concurrent or lim.tokens_per_day or lim.tokens_per_month or lim.cost_limited
                          for _, lim, _ in subjects)
        self.tpm_args = tuple(tpm)
        # refresh.lua's KEYS: lease zset, lease:tok and lease:cost hashes per subject (not day-dependent)
        self.lease_keys = [k.encode() for s in self.subjects
                           for k in (contract.lease_key(s, tag), contract.lease_tokens_key(s, tag),
                                     contract.lease_cost_key(s, tag))]
        self.allows_model = compile_globs(tuple(key.models))
        self.priority = key.priority if key.priority in contract.PRIORITIES else contract.DEFAULT_PRIORITY
        self.encoded: tuple | None = None  # admission's pre-encoded script call parts
        self._keys_day = ""
        self._admit_keys: list[bytes] = []
        self._settle_keys: list[bytes] = []

    def redis_keys(self, day: str, month: str) -> tuple[list[bytes], list[bytes]]:
        """KEYS for admit.lua and settle.lua, rebuilt only when the UTC day changes."""
        if day != self._keys_day:
            admit: list[str] = []
            settle: list[str] = []
            tag = self.tag
            for subject in self.subjects:
                day_key = contract.day_usage_key(subject, day, tag)
                month_key = contract.month_usage_key(subject, month, tag)
                bucket_req = contract.request_bucket_key(subject, tag)
                bucket_tok = contract.token_bucket_key(subject, tag)
                lease = contract.lease_key(subject, tag)
                lease_tok = contract.lease_tokens_key(subject, tag)
                lease_cost = contract.lease_cost_key(subject, tag)
                admit += [k.encode() for k in (bucket_req, bucket_tok, lease, lease_tok, day_key, month_key, lease_cost)]
                settle += [k.encode() for k in (bucket_tok, lease, lease_tok, day_key, month_key, lease_cost)]
            admit.append(contract.undone_key(self.subjects[0], tag).encode())  # tombstones (undo.lua)
            self._admit_keys, self._settle_keys, self._keys_day = admit, settle, day
        return self._admit_keys, self._settle_keys

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


def _num(value: Any) -> bytes:
    """A limit as a script argument; 0 means "no limit of this kind"."""
    if value is None:
        return b"0"
    text = repr(value) if isinstance(value, float) and not value.is_integer() else str(int(value))
    return text.encode()


def _micro(value: Any) -> bytes:
    """A cost limit (currency) as integer micro-units; 0 means "no limit of this kind"."""
    return b"0" if value is None else str(contract.to_micro(value)).encode()


def cost_args(prices: tuple["contract.Price | None", ...] | None, prompt: int, completion: int,
              cached: int = 0) -> tuple[bytes, bytes]:
    """The two per-subject cost arguments of admit/settle/undo (micro-units; ``0`` = none)."""
    if prices is None:
        return _NO_COST
    costs = [str(p.cost(prompt, completion, cached)).encode() if p is not None else b"0" for p in prices]
    return (costs[0], costs[1] if len(costs) > 1 else b"0")


_NO_COST = (b"0", b"0")


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
