"""Config cache: positive and negative answers are cached for the TTL, refusals are explicit;
the Authenticator turns a presented key into a Principal or the one refusal, on one clock."""

from __future__ import annotations

import time

import pytest
from redis import exceptions as redis_errors

from atlas_core import contract
from atlas_devstack.waiting import wait_for_async
from atlas_gateway.auth.authenticator import Authenticator
from atlas_gateway.auth.config_cache import ConfigCache
from atlas_gateway.http import errors

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
    await fake_redis.set(contract.key_config_key(key_hash), contract.KeyConfig("team", "k", key_hash[:8]).encode())
    assert await cache.lookup(key_hash) is not None
    await fake_redis.delete(contract.key_config_key(key_hash))

    async def refused() -> bool:
        return await cache.lookup(key_hash) is None

    await wait_for_async("the deleted key to be refused", refused, 2)
    assert cache.stale(key_hash) is None


async def test_missing_quota_is_refused_not_unlimited(fake_redis):
    cache = ConfigCache(fake_redis, ttl=1)
    key_hash = contract.hash_api_key("sk-2")
    await fake_redis.set(
        contract.key_config_key(key_hash), contract.KeyConfig("team", "k", key_hash[:8], quota="gone").encode()
    )
    principal = await cache.lookup(key_hash)
    refusal = principal.refusal(time.time())
    assert refusal.status == 403 and refusal.code == "QuotaNotFound"


@pytest.mark.parametrize(
    "fields,code",
    [
        ({"suspended": True}, "Suspended"),
        ({"expires_at": 1.0}, "Expired"),
        ({"refusal": "SecretInvalid", "refusal_message": "bad secret"}, "SecretInvalid"),
    ],
)
def test_refusals(fields, code):
    principal = make_principal(contract.Limits(), **fields)
    refusal = principal.refusal(time.time())
    assert refusal.status == 403 and refusal.type == "permission_error" and refusal.code == code


def test_future_expiry_is_fine():
    assert make_principal(contract.Limits(), expires_at=time.time() + 3600).refusal(time.time()) is None


class _Unreachable:
    async def get(self, name):
        raise redis_errors.ConnectionError("Redis went away")


class _Health:
    def __init__(self) -> None:
        self.failures = 0

    def failed(self, fail_open: bool, exc: BaseException) -> None:
        self.failures += 1


async def test_authenticator_refuses_on_its_own_clock(fake_redis):
    now = [1_000.0]
    auth = Authenticator(ConfigCache(fake_redis, ttl=60), _Health(), fail_open=False, clock=lambda: now[0])
    key_hash = contract.hash_api_key("sk-clock")
    await fake_redis.set(
        contract.key_config_key(key_hash), contract.KeyConfig("team", "k", key_hash[:8], expires_at=2_000.0).encode()
    )
    assert (await auth.authenticate("sk-clock")).ref == "team/k"
    now[0] = 2_000.0  # the key's expiresAt, by the authenticator's clock (not the test's)
    with pytest.raises(errors.GatewayError) as refused:
        await auth.authenticate("sk-clock")
    assert (refused.value.status, refused.value.code) == (403, "Expired")


@pytest.mark.parametrize("key, message", [(None, "Missing API key"), ("sk-nobody", "Incorrect API key")])
async def test_authenticator_401s(fake_redis, key, message):
    auth = Authenticator(ConfigCache(fake_redis, ttl=60), _Health(), fail_open=False)
    with pytest.raises(errors.GatewayError) as refused:
        await auth.authenticate(key)
    assert (refused.value.status, refused.value.code) == (401, "invalid_api_key")
    assert refused.value.message.startswith(message)


async def test_authenticator_fails_open_only_for_keys_it_has_seen(fake_redis):
    health = _Health()
    auth = Authenticator(ConfigCache(fake_redis, ttl=0), health, fail_open=True)
    key_hash = contract.hash_api_key("sk-seen")
    await fake_redis.set(contract.key_config_key(key_hash), contract.KeyConfig("team", "seen", key_hash[:8]).encode())
    assert (await auth.authenticate("sk-seen")).ref == "team/seen"
    auth.cache.redis = _Unreachable()
    assert (await auth.authenticate("sk-seen")).ref == "team/seen"  # the stale entry
    with pytest.raises(errors.GatewayError) as refused:
        await auth.authenticate("sk-never-seen")
    assert (refused.value.status, refused.value.code) == (503, "quota_store_unavailable")
    assert health.failures == 2
