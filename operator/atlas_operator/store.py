"""Config writes to Redis through the contract, each one skipped when Redis already agrees.

The operator is the only writer of config. Every function here reads first and writes only a
difference, so a resumed operator (or a repeated reconcile) makes no Redis writes at all.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Any, Iterable

from atlas_core import contract
from atlas_core.contract import KeyConfig, PreviousKey, QuotaConfig

from . import bindings, rotation


def _text(value: Any) -> str | None:
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else str(value)


def _raw(value: Any) -> bytes | None:
    if value is None:
        return None
    return value if isinstance(value, bytes) else str(value).encode()


async def owner_of_hash(redis: Any, key_hash: str) -> str | None:
    """``namespace/name`` of the AtlasKey whose config sits under ``key_hash`` (None: free)."""
    raw = await redis.get(contract.key_config_key(key_hash))
    if raw is None:
        return None
    try:
        return KeyConfig.decode(raw).ref
    except (ValueError, KeyError):
        return None


async def served_hash(redis: Any, ref: str) -> str | None:
    """The key hash the gateway serves for AtlasKey ``namespace/name`` (the key index)."""
    return _text(await redis.hget(contract.KEY_INDEX, ref))


@dataclass(frozen=True)
class KeyWrite:
    written: bool
    rotated_from: str | None = None  # previous hash, when this write rotated the key
    previous: PreviousKey | None = None  # the previous key still accepted (rotationGracePeriod)
    retired: str | None = None  # a previous key whose grace period ended with this write


async def write_key_config(
    redis: Any,
    key_hash: str,
    config: KeyConfig,
    grace_seconds: float = 0.0,
    now: float | None = None,
) -> KeyWrite:
    """Make Redis hold ``config`` under ``key_hash`` for this AtlasKey; on rotation drop the
    hash it had before, or keep it working ``grace_seconds`` longer (rotation.step)."""
    now = time.time() if now is None else now
    ref = config.ref
    pipe = redis.pipeline(transaction=False)
    pipe.hget(contract.KEY_INDEX, ref)
    pipe.get(contract.key_config_key(key_hash))
    pipe.hget(contract.PREVIOUS_KEY_INDEX, ref)
    served, current, previous_raw = await pipe.execute()
    served = _text(served)
    previous = _previous(previous_raw)
    plan = rotation.step(served, previous, key_hash, grace_seconds, now)
    if (
        plan.previous is not None
        and plan.rotated_from
        and await owner_of_hash(redis, plan.rotated_from) not in (ref, None)
    ):
        plan = rotation.RotationStep(None, rotated_from=plan.rotated_from)  # not ours to keep serving
    encoded = config.encode()
    previous_encoded = _previous_config(config, plan.previous)
    unchanged = served == key_hash and _raw(current) == encoded and not plan.drop and plan.previous == previous
    if unchanged and plan.previous is not None:
        unchanged = _raw(await redis.get(contract.key_config_key(plan.previous.key_hash))) == previous_encoded
    if unchanged:
        return KeyWrite(False, previous=plan.previous)
    tx = redis.pipeline(transaction=True)
    tx.set(contract.key_config_key(key_hash), encoded)
    tx.hset(contract.KEY_INDEX, ref, key_hash)
    for stale in plan.drop:
        if stale != key_hash and await owner_of_hash(redis, stale) in (ref, None):
            tx.delete(contract.key_config_key(stale))
    if plan.previous is not None:
        # Expires by itself at the deadline: the old key is refused on time even if the operator is down.
        tx.set(contract.key_config_key(plan.previous.key_hash), previous_encoded, pxat=int(plan.previous.until * 1000))
        tx.hset(contract.PREVIOUS_KEY_INDEX, ref, plan.previous.encode())
    elif previous is not None:
        tx.hdel(contract.PREVIOUS_KEY_INDEX, ref)
    await tx.execute()
    return KeyWrite(True, plan.rotated_from, plan.previous, plan.retired)


def _previous(raw: Any) -> PreviousKey | None:
    if raw is None:
        return None
    try:
        return PreviousKey.decode(raw)
    except ValueError:
        return None


def _previous_config(config: KeyConfig, previous: PreviousKey | None) -> bytes | None:
    """The previous key's config: the current one (same usage identity) under its own keyId,
    refused by the gateway from the deadline on (``expiresAt``) even before Redis drops it."""
    if previous is None:
        return None
    until = previous.until if config.expires_at is None else min(config.expires_at, previous.until)
    return replace(config, key_id=contract.key_id_of(previous.key_hash), expires_at=until).encode()


async def delete_key_config(redis: Any, namespace: str, name: str) -> bool:
    """Remove this AtlasKey's config, and its previous key's (the gateway then refuses both).
    Usage counters stay."""
    ref = f"{namespace}/{name}"
    pipe = redis.pipeline(transaction=False)
    pipe.hget(contract.KEY_INDEX, ref)
    pipe.hget(contract.PREVIOUS_KEY_INDEX, ref)
    served, previous_raw = await pipe.execute()
    served = _text(served)
    previous = _previous(previous_raw)
    if served is None and previous_raw is None:
        return False
    tx = redis.pipeline(transaction=True)
    for stale in (served, previous.key_hash if previous else None):
        if stale is not None and await owner_of_hash(redis, stale) in (ref, None):
            tx.delete(contract.key_config_key(stale))
    tx.hdel(contract.KEY_INDEX, ref)
    tx.hdel(contract.PREVIOUS_KEY_INDEX, ref)
    await tx.execute()
    return True


async def write_quota_config(redis: Any, config: QuotaConfig) -> bool:
    key = contract.quota_config_key(config.namespace, config.name)
    pipe = redis.pipeline(transaction=False)
    pipe.get(key)
    pipe.sismember(contract.QUOTA_INDEX, config.ref)
    current, indexed = await pipe.execute()
    encoded = config.encode()
    if _raw(current) == encoded and indexed:
        return False
    tx = redis.pipeline(transaction=True)
    tx.set(key, encoded)
    tx.sadd(contract.QUOTA_INDEX, config.ref)
    await tx.execute()
    return True


async def delete_quota_config(redis: Any, namespace: str, name: str) -> bool:
    tx = redis.pipeline(transaction=True)
    tx.delete(contract.quota_config_key(namespace, name))
    tx.srem(contract.QUOTA_INDEX, f"{namespace}/{name}")
    deleted, _ = await tx.execute()
    return bool(deleted)


async def epoch_present(redis: Any) -> bool:
    return bool(await redis.exists(contract.CONFIG_EPOCH))


async def write_all(
    redis: Any,
    keys: Iterable[tuple[str, KeyConfig]],
    quotas: Iterable[QuotaConfig],
    identity: tuple[dict[str, str], dict[str, str]] | None = None,
    batch: int = 2000,
) -> int:
    """Bulk rewrite (self-healing): every config in pipelined batches, the token subjects'
    bindings and bound ServiceAccount UIDs (``identity``), then the epoch."""
    written = 0
    pipe = redis.pipeline(transaction=False)
    pending = 0
    if identity is not None:
        for command in bindings.rewrite_commands(*identity):
            pipe.execute_command(*command)
            pending += 1
    for quota in quotas:
        pipe.set(contract.quota_config_key(quota.namespace, quota.name), quota.encode())
        pipe.sadd(contract.QUOTA_INDEX, quota.ref)
        pending += 1
    for key_hash, config in keys:
        pipe.set(contract.key_config_key(key_hash), config.encode())
        pipe.hset(contract.KEY_INDEX, config.ref, key_hash)
        pending += 1
        if pending >= batch:
            await pipe.execute()
            written += pending
            pending = 0
    await pipe.execute()
    written += pending
    await redis.set(contract.CONFIG_EPOCH, str(int(time.time())))
    return written
