"""Trusted token issuers: the chart's jwt entries parsed (or refused, naming the field), the
cluster's issuer read from the API server's discovery, publication that writes only changes
and keeps what a failed fetch could not refresh."""

from __future__ import annotations

import json

import pytest

from atlas_core import contract
from atlas_core.contract import Issuer
from atlas_operator.issuers import (
    CLUSTER_JWKS_PATH,
    DISCOVERY_PATH,
    IssuerConfigError,
    IssuerRefresher,
    parse_oidc_issuers,
    publish,
)

EC_JWK = {
    "kty": "EC",
    "kid": "k1",
    "crv": "P-256",
    "x": "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU",
    "y": "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0",
    "use": "sig",
    "alg": "ES256",
}


def entry(**issuer):
    return {
        "issuer": {"url": "https://login.example.com", **issuer},
        "claimMappings": {"username": {"claim": "email", "prefix": "oidc:"}, "groups": {"claim": "groups"}},
    }


def test_jwt_entries_parse_with_kube_apiservers_names():
    (issuer,) = parse_oidc_issuers(json.dumps([entry(audiences=["atlas", "atlas-dev"])]), "atlas")
    assert issuer.url == "https://login.example.com" and issuer.audiences == ("atlas", "atlas-dev")
    assert (issuer.username_claim, issuer.username_prefix, issuer.groups_claim) == ("email", "oidc:", "groups")
    (default,) = parse_oidc_issuers(json.dumps([{"issuer": {"url": "https://a.example"}}]), "atlas")
    assert default.audiences == ("atlas",) and default.username_claim == "sub" and default.groups_claim == ""
    assert parse_oidc_issuers("", "atlas") == () and parse_oidc_issuers("[]", "atlas") == ()


@pytest.mark.parametrize(
    "doc, expected",
    [
        ("{", "ATLAS_JWT_ISSUERS is not JSON"),
        (json.dumps({"issuer": {}}), "must be a JSON list"),
        (json.dumps([entry(url="http://login.example.com")]), "jwt[0].issuer.url: must be an https:// URL"),
        (json.dumps([entry(url="https://login.example.com/")]), "no trailing slash"),
        (json.dumps([entry(), entry()]), "jwt[1].issuer.url"),
        (json.dumps([{**entry(), "claimValidationRules": []}]), "jwt[0]: unsupported field(s) claimValidationRules"),
        (json.dumps([entry(audiences="atlas")]), "jwt[0].issuer.audiences"),
        (json.dumps([entry(audienceMatchPolicy="MatchAll")]), "audienceMatchPolicy"),
        (json.dumps([entry(certificateAuthority="not a pem")]), "certificateAuthority: must be PEM"),
        (
            json.dumps(
                [{"issuer": {"url": "https://a.example"}, "claimMappings": {"username": {"expression": "claims.sub"}}}]
            ),
            "jwt[0].claimMappings.username: unsupported field(s) expression",
        ),
    ],
)
def test_jwt_entries_atlas_cannot_enforce_are_refused_naming_the_field(doc, expected):
    with pytest.raises(IssuerConfigError) as info:
        parse_oidc_issuers(doc, "atlas")
    assert expected in str(info.value)


async def test_the_cluster_issuer_is_read_from_the_api_servers_discovery(kube, redis):
    kube.documents[DISCOVERY_PATH] = {
        "issuer": "https://10.0.0.1:6443",
        "jwks_uri": "https://10.0.0.1:6443/openid/v1/jwks",
    }
    kube.documents[CLUSTER_JWKS_PATH] = {"keys": [{**EC_JWK, "d": "private!"}, {"kty": "oct", "k": "c2VjcmV0"}]}
    refresher = IssuerRefresher((), "atlas", kube.get_json)
    assert await refresher.refresh(redis) == ["https://10.0.0.1:6443"]
    stored = Issuer.decode(await redis.hget(contract.IDENTITY_ISSUERS, "https://10.0.0.1:6443"))
    assert stored.service_accounts and stored.audiences == ("atlas",)
    assert stored.keys == (EC_JWK,)  # public members only; the symmetric key dropped
    assert await refresher.refresh(redis) == []  # unchanged keys: no write


async def test_a_failed_fetch_keeps_what_was_published_and_a_removed_issuer_goes(kube, redis):
    kube.documents[DISCOVERY_PATH] = {"issuer": "https://cluster", "jwks_uri": "https://cluster/openid/v1/jwks"}
    kube.documents[CLUSTER_JWKS_PATH] = {"keys": [EC_JWK]}
    await redis.hset(
        contract.IDENTITY_ISSUERS, "https://gone.example", Issuer("https://gone.example", ("atlas",)).encode()
    )
    refresher = IssuerRefresher((), "atlas", kube.get_json)
    await refresher.refresh(redis)
    assert set(await redis.hkeys(contract.IDENTITY_ISSUERS)) == {b"https://cluster"}
    del kube.documents[CLUSTER_JWKS_PATH]  # the API server answers 404 now
    fresh = IssuerRefresher((), "atlas", kube.get_json)  # a restarted operator
    assert await fresh.refresh(redis) == [] and fresh.errors["cluster"].startswith("ApiError")
    assert set(await redis.hkeys(contract.IDENTITY_ISSUERS)) == {b"https://cluster"}
    assert fresh.unfetched()


async def test_publish_rewrites_a_changed_key_set(redis):
    first = Issuer("https://a.example", ("atlas",), (EC_JWK,), fetched_at=1.0)
    assert await publish(redis, [first], ["https://a.example"]) == ["https://a.example"]
    assert (
        await publish(
            redis, [Issuer("https://a.example", ("atlas",), (EC_JWK,), fetched_at=2.0)], ["https://a.example"]
        )
        == []
    )  # only the fetch time differs
    rotated = Issuer("https://a.example", ("atlas",), (EC_JWK, {**EC_JWK, "kid": "k2"}), fetched_at=3.0)
    assert await publish(redis, [rotated], ["https://a.example"]) == ["https://a.example"]
    assert len(Issuer.decode(await redis.hget(contract.IDENTITY_ISSUERS, "https://a.example")).keys) == 2
