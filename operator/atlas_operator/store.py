"""Config writes to Redis through the contract, each one skipped when Redis already agrees.

The operator is the only writer of config. Every function here reads first and writes only a
difference, so a resumed operator (or a repeated reconcile) makes no Redis writes at all.
"""

from __future__ import annotations

import time
from typing import Any, Iterable

from atlas_core import contract
from atlas_core.contract import KeyConfig, QuotaConfig


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


async def write_key_config(redis: Any, key_hash: str, config: KeyConfig) -> tuple[bool, str | None]:
    """Make Redis hold ``config`` under ``key_hash`` for this AtlasKey, and nothing under the
    hash it had before (rotation). Returns (written, previous hash when it changed)."""
    ref = config.ref
    pipe = redis.pipeline(transaction=False)
    pipe.hget(contract.KEY_INDEX, ref)
    pipe.get(contract.key_config_key(key_hash))
    previous, current = await pipe.execute()
    previous = _text(previous)
    encoded = config.encode()
    if previous == key_hash and _raw(current) == encoded:
        return False, None
    tx = redis.pipeline(transaction=True)
    tx.set(contract.key_config_key(key_hash), encoded)
    tx.hset(contract.KEY_INDEX, ref, key_hash)
    rotated = previous if previous and previous != key_hash else None
    if rotated and await owner_of_hash(redis, rotated) in (ref, None):
        tx.delete(contract.key_config_key(rotated))
    await tx.execute()
    return True, rotated


async def delete_key_config(redis: Any, namespace: str, name: str) -> bool:
    """Remove this AtlasKey's config (the gateway then refuses its key). Usage counters stay."""
    ref = f"{namespace}/{name}"
    previous = _text(await redis.hget(contract.KEY_INDEX, ref))
    if previous is None:
        return False
    tx = redis.pipeline(transaction=True)
    if await owner_of_hash(redis, previous) in (ref, None):
        tx.delete(contract.key_config_key(previous))
    tx.hdel(contract.KEY_INDEX, ref)
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
    batch: int = 2000,
) -> int:
    """Bulk rewrite (self-healing): every config in pipelined batches, then the epoch."""
    written = 0
    pipe = redis.pipeline(transaction=False)
    pending = 0
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
