"""A real OIDC issuer (oidc-provider-mock over HTTPS with a CA of its own) and a real Redis: the
operator's fetch trusts the issuer only through the configured CA, publishes its keys, and the
gateway's verifier accepts that issuer's real ID tokens for the bound User and Group, and
refuses what it must. On a Redis Cluster too (every identity key is in the {config} slot)."""

from __future__ import annotations

import hashlib
import json
import time
import urllib.error

import pytest
import redis.asyncio as aioredis

from atlas_core import contract
from atlas_devstack.oidc_issuer import OidcIssuerProcess
from atlas_gateway.auth.identity_tokens import TokenAuthenticator, TokenRefused
from atlas_operator.issuers import IssuerRefresher, fetch_oidc, parse_oidc_issuers


@pytest.fixture(scope="module")
def issuer(tmp_path_factory):
    with OidcIssuerProcess(log_path=str(tmp_path_factory.mktemp("oidc") / "issuer.log")) as process:
        yield process


def configured(issuer, **claim_mappings):
    (parsed,) = parse_oidc_issuers(json.dumps([issuer.jwt_config(**claim_mappings)]), "atlas")
    return parsed


async def test_the_issuer_is_trusted_only_through_its_configured_ca(issuer):
    published = await fetch_oidc(configured(issuer), time.time())
    assert published.url == issuer.url and published.keys and not published.service_accounts
    assert all("d" not in key for key in published.keys)
    untrusted = configured(issuer)
    untrusted = type(untrusted)(**{**untrusted.__dict__, "certificate_authority": ""})
    with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
        await fetch_oidc(untrusted, time.time())


async def bind(client, **bindings):
    await client.hset(contract.IDENTITY_BINDINGS, mapping=bindings)


async def key_of(auth, token):
    return await auth.key_hash(token, hashlib.sha256(token.encode()).hexdigest())


async def check_real_tokens(client, issuer):
    refresher = IssuerRefresher((configured(issuer),), None, None)
    assert await refresher.refresh(client) == [issuer.url]
    await bind(client, **{"User:alice@example.com": "team/alice", "Group:team-search": "team/search"})
    await client.hset(contract.KEY_INDEX, mapping={"team/alice": "a" * 64, "team/search": "b" * 64})
    auth = TokenAuthenticator(client)

    alice = issuer.id_token("alice", {"email": "alice@example.com", "email_verified": True, "groups": ["eng"]})
    assert await key_of(auth, alice) == "a" * 64
    bob = issuer.id_token("bob", {"email": "bob@example.com", "email_verified": True, "groups": ["team-search"]})
    assert await key_of(auth, bob) == "b" * 64
    eve = issuer.id_token("eve", {"email": "eve@example.com", "email_verified": True, "groups": ["eng"]})
    with pytest.raises(TokenRefused, match="No AtlasKey binds User 'eve@example.com'"):
        await key_of(auth, eve)
    other_audience = issuer.id_token(
        "alice", {"email": "alice@example.com", "email_verified": True}, client_id="another-app"
    )
    with pytest.raises(TokenRefused, match="audience is not this gateway's"):
        await key_of(auth, other_audience)


async def test_real_id_tokens_authenticate_as_the_bound_user_and_group(redis_url, issuer):
    client = aioredis.Redis.from_url(redis_url)
    try:
        await check_real_tokens(client, issuer)
    finally:
        await client.aclose()


async def test_real_id_tokens_on_a_redis_cluster(cluster_client, redis_cluster, issuer):
    client = aioredis.RedisCluster.from_url(redis_cluster.url)
    try:
        await check_real_tokens(client, issuer)
    finally:
        await client.aclose()
