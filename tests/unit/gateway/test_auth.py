"""Config cache: positive and negative answers are cached for the TTL, refusals are explicit."""

from __future__ import annotations

import time

import pytest

from atlas_core import contract
from atlas_gateway.auth import ConfigCache

from .conftest import make_principal




async def test_unknown_key_is_cached_negatively(fake_redis):
    cache = ConfigCache(fake_redis, ttl=60)
    key_hash = contract.hash_api_key("sk-unknown")
    assert await cache.lookup(key_hash) is None
    cfg = contract.KeyConfig("team", "late", contract.key_id_of(key_hash))
    await fake_redis.set(contract.key_config_key(key_hash), cfg.encode())
    assert await cache.lookup(key_hash) is None  # still the cached "unknown" within the TTL
    cache.ttl = 0
    cache._entries.clear()
    assert (await cache.lookup(key_hash)).ref == "team/late"


async def test_deleted_key_refused_after_ttl(fake_redis):
    cache = ConfigCache(fake_redis, ttl=0.05)
    key_hash = contract.hash_api_key("sk-1")
    await fake_redis.set(contract.key_config_key(key_hash),
                         contract.KeyConfig("team", "k", key_hash[:8]).encode())
    assert await cache.lookup(key_hash) is not None
    await fake_redis.delete(contract.key_config_key(key_hash))
    deadline = time.monotonic() + 2
    while await cache.lookup(key_hash) is not None:
        assert time.monotonic() < deadline, "deleted key still accepted after 2 s"
    assert cache.stale(key_hash) is None


async def test_missing_quota_is_refused_not_unlimited(fake_redis):
    cache = ConfigCache(fake_redis, ttl=1)
    key_hash = contract.hash_api_key("sk-2")
    await fake_redis.set(contract.key_config_key(key_hash),
                         contract.KeyConfig("team", "k", key_hash[:8], quota="gone").encode())
    principal = await cache.lookup(key_hash)
    refusal = principal.refusal(time.time())
    assert refusal.status == 403 and refusal.code == "QuotaNotFound"


@pytest.mark.parametrize("fields,code", [
    ({"suspended": True}, "Suspended"),
    ({"expires_at": 1.0}, "Expired"),
    ({"refusal": "SecretInvalid", "refusal_message": "bad secret"}, "SecretInvalid"),
])
def test_refusals(fields, code):
    principal = make_principal(contract.Limits(), **fields)
    refusal = principal.refusal(time.time())
    assert refusal.status == 403 and refusal.type == "permission_error" and refusal.code == code


def test_future_expiry_is_fine():
    assert make_principal(contract.Limits(), expires_at=time.time() + 3600).refusal(time.time()) is None
