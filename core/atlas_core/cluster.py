"""Redis Cluster basics both planes share: the mode setting, detection, key slots and the
redis-py client for config reads and usage reads.

``ATLAS_REDIS_CLUSTER``: ``true`` (a Redis Cluster), ``false`` (one Redis), or ``auto`` (the
default: ask the server at start-up with ``INFO cluster``; a server that cannot be reached then is
taken for a single Redis, so a cluster should be named explicitly where start-up order is not
guaranteed). Every key the contract names carries a hash tag, so each script call touches one
slot (core/atlas_core/contract.py).
"""

from __future__ import annotations

import logging
from typing import Any

import redis.asyncio as aioredis
from redis import exceptions as redis_errors
from redis.asyncio.cluster import ClusterPipeline, RedisCluster

from . import sentinel
from .flags import parse_flag

log = logging.getLogger("atlas")

SLOTS = 16384
MODES = ("true", "false", "auto")


def parse_mode(raw: str | None) -> str:
    """``ATLAS_REDIS_CLUSTER`` as one of :data:`MODES` (unset: ``auto``)."""
    value = (raw or "auto").strip().lower()
    if value == "auto":
        return value
    try:
        return "true" if parse_flag(value) else "false"
    except ValueError:
        raise ValueError(f"ATLAS_REDIS_CLUSTER must be true, false or auto, not {raw!r}") from None


def _crc16_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
        table.append(crc & 0xFFFF)
    return table


_CRC16 = _crc16_table()


def crc16(data: bytes) -> int:
    """CRC16-CCITT (XMODEM), the checksum Redis Cluster hashes keys with."""
    crc = 0
    for byte in data:
        crc = ((crc << 8) & 0xFFFF) ^ _CRC16[((crc >> 8) ^ byte) & 0xFF]
    return crc


def key_slot(key: bytes | str) -> int:
    """The cluster slot of ``key``: of its hash tag (the first non-empty ``{...}``) if it has one."""
    if isinstance(key, str):
        key = key.encode()
    start = key.find(b"{")
    if start >= 0:
        end = key.find(b"}", start + 1)
        if end > start + 1:
            key = key[start + 1 : end]
    return crc16(key) % SLOTS


async def detect(url: str, timeout: float) -> bool:
    """Whether the server at ``url`` runs in cluster mode (False when it cannot be asked)."""
    if sentinel.is_sentinel_url(url):
        return False  # Sentinel watches a master with replicas; it does not front a Redis Cluster
    client = aioredis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
    try:
        info = await client.info("cluster")
        return bool(int(info.get("cluster_enabled", 0)))
    except Exception as exc:  # unreachable or refused: fall back to a single Redis, and say so
        log.warning(
            "could not detect whether Redis is a cluster (%s: %s): assuming a single Redis; "
            "set ATLAS_REDIS_CLUSTER=true for a Redis Cluster",
            type(exc).__name__,
            exc,
        )
        return False
    finally:
        await client.aclose()


async def resolve(mode: str, url: str, timeout: float) -> bool:
    """Cluster mode on or off for ``mode`` (:func:`parse_mode`)."""
    if mode == "auto":
        return await detect(url, timeout)
    return mode == "true"


def _closed_transport(exc: RuntimeError) -> redis_errors.ConnectionError | None:
    """Under uvloop, redis-py's cluster client can write to a connection the node just closed
    (its handshake on a new connection to a node going down): uvloop raises RuntimeError
    ("the handler is closed"). That is a lost connection, and is raised as one."""
    if "handler is closed" in str(exc):
        return redis_errors.ConnectionError(f"connection to a Redis Cluster node closed: {exc}")
    return None


class _Pipeline(ClusterPipeline):
    async def execute(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return await super().execute(*args, **kwargs)
        except RuntimeError as exc:
            lost = _closed_transport(exc)
            if lost is None:
                raise
            raise lost from exc


class AtlasRedisCluster(RedisCluster):
    """redis-py's RedisCluster whose failures are all RedisErrors (see :func:`_closed_transport`)."""

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return await super().execute_command(*args, **kwargs)
        except RuntimeError as exc:
            lost = _closed_transport(exc)
            if lost is None:
                raise
            raise lost from exc

    def pipeline(self, transaction: Any = None, shard_hint: Any = None) -> ClusterPipeline:
        if shard_hint:
            raise redis_errors.RedisClusterException("shard_hint is deprecated in cluster mode")
        return _Pipeline(self, transaction)  # type: ignore[abstract]  # (redis-py's attribute, set by its __init__)


def redis_py_client(url: str, cluster: bool, **kwargs: Any) -> Any:
    """redis-py's asyncio client, or its RedisCluster (slot map, MOVED/ASK, per-node pipelines)."""
    if not cluster:
        return sentinel.redis_from_url(url, **kwargs)  # one Redis, or the master Sentinel names
    kwargs.pop("max_connections", None)  # per node in RedisCluster: its default suits it
    kwargs.pop("health_check_interval", None)
    kwargs.pop("retry_on_timeout", None)
    return AtlasRedisCluster.from_url(url, **kwargs)
