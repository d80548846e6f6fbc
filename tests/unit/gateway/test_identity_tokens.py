"""Workload identity tokens verified against what the operator publishes (fakeredis): the
accepted shapes, and every hostile one refused with a clear 401/403 (never an exception)."""

from __future__ import annotations

import base64
import hashlib
import json
import time

import fakeredis
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from atlas_core import contract
from atlas_core.contract import Issuer
from atlas_gateway.auth.identity_tokens import TokenAuthenticator, TokenRefused, looks_like_jwt

CLUSTER = "https://kubernetes.default.svc"
OIDC = "https://login.example.com"
SA_UID = "8a9c3e1f-0000-4000-8000-000000000001"
KEY_HASH = "ab" * 32


def jwk(private, kid, alg=None):
    public = private.public_key()
    algorithm = (
        ECAlgorithm
        if isinstance(private, ec.EllipticCurvePrivateKey)
        else OKPAlgorithm
        if isinstance(private, ed25519.Ed25519PrivateKey)
        else RSAAlgorithm
    )
    doc = algorithm.to_jwk(public, as_dict=True)
    doc["kid"] = kid
    if alg:
        doc["alg"] = alg
    return doc


EC_KEY = ec.generate_private_key(ec.SECP256R1())
RSA_KEY = rsa.generate_private_key(65537, 2048)
ED_KEY = ed25519.Ed25519PrivateKey.generate()
OTHER_EC = ec.generate_private_key(ec.SECP256R1())


def sa_claims(name="batch-runner", namespace="jobs", uid=SA_UID, **extra):
    now = int(time.time())
    claims = {
        "iss": CLUSTER,
        "aud": ["atlas"],
        "sub": f"system:serviceaccount:{namespace}:{name}",
        "iat": now,
        "nbf": now,
        "exp": now + 3600,
        "kubernetes.io": {"namespace": namespace, "serviceaccount": {"name": name, "uid": uid}},
    }
    claims.update(extra)
    return claims


def oidc_claims(**extra):
    now = int(time.time())
    claims = {
        "iss": OIDC,
        "aud": "atlas",
        "sub": "u-1",
        "email": "alice@example.com",
        "email_verified": True,
        "groups": ["team-search", "everyone"],
        "iat": now,
        "exp": now + 600,
    }
    claims.update(extra)
    return claims


def sign(claims, key=EC_KEY, alg="ES256", kid="sa-1"):
    headers = {"kid": kid} if kid is not None else {}
    return jwt.encode(claims, key, algorithm=alg, headers=headers)


def b64(doc):
    return base64.urlsafe_b64encode(json.dumps(doc).encode()).rstrip(b"=").decode()


@pytest.fixture
async def redis():
    client = fakeredis.FakeAsyncRedis()
    await client.hset(
        contract.IDENTITY_ISSUERS,
        mapping={
            CLUSTER: Issuer(CLUSTER, ("atlas",), (jwk(EC_KEY, "sa-1"),), service_accounts=True).encode(),
            OIDC: Issuer(
                OIDC,
                ("atlas",),
                (jwk(RSA_KEY, "rsa-1", "RS256"), jwk(ED_KEY, "ed-1")),
                username_claim="email",
                groups_claim="groups",
                groups_prefix="oidc:",
            ).encode(),
        },
    )
    await client.hset(
        contract.IDENTITY_BINDINGS,
        mapping={
            "ServiceAccount:jobs/batch-runner": "team/batch",
            "User:alice@example.com": "team/alice",
            "Group:oidc:search-a": "team/a",
            "Group:oidc:search-b": "team/b",
            "Group:oidc:team-search": "team/search",
        },
    )
    await client.hset(contract.IDENTITY_SERVICE_ACCOUNTS, "jobs/batch-runner", SA_UID)
    await client.hset(
        contract.KEY_INDEX, mapping={"team/batch": KEY_HASH, "team/alice": "cd" * 32, "team/search": "ef" * 32}
    )
    yield client
    await client.aclose()


@pytest.fixture
def auth(redis):
    return TokenAuthenticator(redis, leeway=10)


async def key_of(auth, token):
    return await auth.key_hash(token, hashlib.sha256(token.encode()).hexdigest())


async def refused(auth, token, *, status=401):
    with pytest.raises(TokenRefused) as info:
        await key_of(auth, token)
    assert info.value.status == status
    assert token not in info.value.message
    return info.value.message


def test_only_jws_shaped_credentials_take_the_token_path():
    assert looks_like_jwt(sign(sa_claims()))
    assert not looks_like_jwt("sk-atlas-" + "a" * 32)
    assert not looks_like_jwt("eyJhbGciOi")  # one part only


async def test_a_service_account_token_authenticates_as_its_bound_key(auth):
    assert await key_of(auth, sign(sa_claims())) == KEY_HASH


async def test_an_oidc_token_authenticates_as_its_users_key_first_then_its_groups(auth):
    assert await key_of(auth, sign(oidc_claims(), RSA_KEY, "RS256", "rsa-1")) == "cd" * 32
    bob = oidc_claims(email="bob@example.com")
    assert await key_of(auth, sign(bob, RSA_KEY, "RS256", "rsa-1")) == "ef" * 32  # group team-search


async def test_eddsa_and_a_token_without_kid_verify(auth):
    assert await key_of(auth, sign(oidc_claims(), ED_KEY, "EdDSA", "ed-1")) == "cd" * 32
    assert await key_of(auth, sign(oidc_claims(), RSA_KEY, "RS256", None)) == "cd" * 32


async def test_a_verified_token_is_not_verified_again_and_its_binding_is_rechecked(redis, monkeypatch):
    clock = [1000.0]
    auth = TokenAuthenticator(redis, recheck=1.0, monotonic=lambda: clock[0])
    token = sign(sa_claims())
    assert await key_of(auth, token) == KEY_HASH
    calls = []
    monkeypatch.setattr(jwt, "decode", lambda *a, **k: calls.append(1))
    assert await key_of(auth, token) == KEY_HASH  # cached: no signature work
    await redis.hdel(contract.IDENTITY_SERVICE_ACCOUNTS, "jobs/batch-runner")  # the account is deleted
    assert await key_of(auth, token) == KEY_HASH  # within the recheck interval
    clock[0] += 1.0
    message = await refused(auth, token)
    assert "ServiceAccount jobs/batch-runner no longer exists" in message
    assert calls == []


async def test_a_recreated_service_account_refuses_the_old_accounts_token(redis, auth):
    await redis.hset(contract.IDENTITY_SERVICE_ACCOUNTS, "jobs/batch-runner", "another-uid")
    assert "no longer exists" in await refused(auth, sign(sa_claims()))


@pytest.mark.parametrize(
    "case, token, expected",
    [
        ("malformed", "eyJhbGciOiJFUzI1NiJ9.not-base64!.x", "not a well-formed JWT"),
        ("not json", "eyJ" + "x" * 10 + ".e30.sig", "not a well-formed JWT"),
        ("alg none", b64({"alg": "none"}) + "." + b64(sa_claims()) + ".", "algorithm 'none' is not accepted"),
        ("no alg", b64({"typ": "JWT"}) + "." + b64(sa_claims()) + ".x", "algorithm None is not accepted"),
        (
            "crit",
            b64({"alg": "ES256", "kid": "sa-1", "crit": ["x"]}) + "." + b64(sa_claims()) + ".x",
            "critical header",
        ),
    ],
)
async def test_malformed_tokens_are_refused(auth, case, token, expected):
    assert expected in await refused(auth, token)


async def test_hmac_with_the_issuers_public_key_as_secret_is_refused(auth):
    """Algorithm confusion: an attacker signs HS256 with the published public key."""
    public_pem = RSA_KEY.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    header = b64({"alg": "HS256", "kid": "rsa-1"})
    payload = b64(oidc_claims())
    import hmac

    sig = base64.urlsafe_b64encode(hmac.new(public_pem, f"{header}.{payload}".encode(), "sha256").digest())
    token = f"{header}.{payload}.{sig.rstrip(b'=').decode()}"
    assert "algorithm 'HS256' is not accepted" in await refused(auth, token)


@pytest.mark.parametrize(
    "case, make, expected",
    [
        (
            "unknown issuer",
            lambda: sign(sa_claims(iss="https://evil.example")),
            "issuer 'https://evil.example' is not trusted",
        ),
        ("unknown kid", lambda: sign(sa_claims(), kid="rotated-away"), "key id 'rotated-away' is not a signing key"),
        ("forged signature", lambda: sign(sa_claims(), OTHER_EC), "signature does not verify"),
        ("wrong audience", lambda: sign(sa_claims(aud=["kubernetes"])), "audience is not this gateway's"),
        ("no audience", lambda: sign({k: v for k, v in sa_claims().items() if k != "aud"}), "no 'aud' claim"),
        ("expired", lambda: sign(sa_claims(exp=int(time.time()) - 60)), "has expired"),
        ("not yet valid", lambda: sign(sa_claims(nbf=int(time.time()) + 600)), "not valid yet"),
        ("no exp", lambda: sign({k: v for k, v in sa_claims().items() if k != "exp"}), "no 'exp' claim"),
        ("key of another family", lambda: sign(sa_claims(), RSA_KEY, "RS256", "sa-1"), "is not a signing key"),
        ("alg the JWK forbids", lambda: sign(oidc_claims(), RSA_KEY, "PS256", "rsa-1"), "is not a signing key"),
        ("unbound account", lambda: sign(sa_claims(name="stranger")), "No AtlasKey binds ServiceAccount jobs/stranger"),
        (
            "sub and account disagree",
            lambda: sign(sa_claims(sub="system:serviceaccount:jobs:admin")),
            "subject does not match",
        ),
        (
            "no kubernetes.io",
            lambda: sign({k: v for k, v in sa_claims().items() if k != "kubernetes.io"}),
            "names no ServiceAccount",
        ),
        (
            "unbound user",
            lambda: sign(oidc_claims(email="eve@example.com", groups=[]), RSA_KEY, "RS256", "rsa-1"),
            "No AtlasKey binds User 'eve@example.com'",
        ),
        (
            "email not verified",
            lambda: sign(oidc_claims(email_verified=False), RSA_KEY, "RS256", "rsa-1"),
            "not verified",
        ),
        (
            "groups not a list",
            lambda: sign(oidc_claims(groups={"a": 1}), RSA_KEY, "RS256", "rsa-1"),
            "not a list of groups",
        ),
    ],
)
async def test_hostile_or_unusable_tokens_are_refused_with_401(auth, case, make, expected):
    assert expected in await refused(auth, make())


async def test_groups_binding_several_keys_are_ambiguous_and_refused(auth):
    token = sign(oidc_claims(email="carol@example.com", groups=["search-a", "search-b"]), RSA_KEY, "RS256", "rsa-1")
    message = await refused(auth, token, status=403)
    assert "bound by several AtlasKeys (team/a, team/b)" in message


async def test_a_bound_key_without_a_usable_secret_is_a_403(redis, auth):
    await redis.hdel(contract.KEY_INDEX, "team/batch")
    assert "AtlasKey team/batch, which binds ServiceAccount jobs/batch-runner, has no usable key" in await refused(
        auth, sign(sa_claims()), status=403
    )


async def test_a_key_published_after_the_token_was_first_seen_is_found(redis):
    auth = TokenAuthenticator(redis, issuer_ttl=3600)
    assert await key_of(auth, sign(sa_claims())) == KEY_HASH  # issuers loaded
    rotated = ec.generate_private_key(ec.SECP256R1())
    await redis.hset(
        contract.IDENTITY_ISSUERS,
        CLUSTER,
        Issuer(CLUSTER, ("atlas",), (jwk(EC_KEY, "sa-1"), jwk(rotated, "sa-2")), service_accounts=True).encode(),
    )
    auth.issuers._loaded_at -= 1.0  # a second later: an unknown kid reloads the issuers
    assert await key_of(auth, sign(sa_claims(), rotated, kid="sa-2")) == KEY_HASH


async def test_a_cached_token_stops_working_when_it_expires(redis):
    wall = [time.time()]
    auth = TokenAuthenticator(redis, leeway=0, clock=lambda: wall[0])
    token = sign(sa_claims(exp=int(wall[0]) + 5))
    assert await key_of(auth, token) == KEY_HASH
    wall[0] += 6
    assert "expired" in await refused(auth, token)


async def test_a_burst_of_a_new_tokens_requests_verifies_it_once(redis, monkeypatch):
    import asyncio

    auth = TokenAuthenticator(redis)
    calls = []
    real_decode = jwt.decode
    monkeypatch.setattr(jwt, "decode", lambda *a, **k: calls.append(1) or real_decode(*a, **k))
    token = sign(sa_claims())
    assert await asyncio.gather(*(key_of(auth, token) for _ in range(50))) == [KEY_HASH] * 50
    assert len(calls) == 1
    forged = sign(sa_claims(), OTHER_EC)
    results = await asyncio.gather(*(key_of(auth, forged) for _ in range(20)), return_exceptions=True)
    assert all(isinstance(r, TokenRefused) and "signature" in r.message for r in results)
    assert len(calls) == 2  # the forged one: once too


@pytest.mark.parametrize(
    "claims",
    [
        {"exp": "tomorrow"},
        {"exp": 10**400},
        {"nbf": [1]},
        {"aud": {"x": 1}},
        {"iat": "now"},
        {"kubernetes.io": "x"},
    ],
)
async def test_odd_claim_shapes_are_refused_never_raised(auth, claims):
    await refused(auth, sign(sa_claims(**claims)))
