"""Workload identity with the real operator (the chart's RBAC), the real kube-apiserver issuing
real tokens (`kubectl create token SA --audience atlas`), a real OIDC issuer and the real
gateway: tokens authenticate as their AtlasKey; a subject bound twice is a conflict on the later
AtlasKey; a deleted or recreated ServiceAccount's token is refused within 60 s."""

from __future__ import annotations

import time

import pytest

from atlas_core import contract

from .procs import key_manifest, wait_until

pytestmark = pytest.mark.cluster

REFUSAL_DEADLINE = 60.0  # design.md: a deleted or recreated ServiceAccount is refused within 60 s


@pytest.fixture(autouse=True)
def _stack(operator, gateway):
    """Every test here needs the operator and the gateway running."""


def sa_subject(name: str) -> dict:
    return {"kind": "ServiceAccount", "name": name}


def uid_of(kube, name: str) -> str:
    return kube.get("serviceaccount", name)["metadata"]["uid"]


def published_uid(redis_client, namespace: str, name: str) -> str | None:
    raw = redis_client.hget(contract.IDENTITY_SERVICE_ACCOUNTS, f"{namespace}/{name}")
    return raw.decode() if raw else None


def binding(redis_client, subject: str) -> str | None:
    raw = redis_client.hget(contract.IDENTITY_BINDINGS, subject)
    return raw.decode() if raw else None


def test_the_cluster_issuer_and_the_oidc_issuer_are_published(redis_client, control_plane, oidc_issuer):
    issuers = wait_until(
        "both issuers published",
        lambda: (
            (
                found := {
                    k.decode(): contract.Issuer.decode(v)
                    for k, v in redis_client.hgetall(contract.IDENTITY_ISSUERS).items()
                }
            )
            and len(found) == 2
            and found
        ),
        30,
    )
    cluster = issuers[control_plane.server]
    assert cluster.service_accounts and cluster.keys and cluster.keys[0]["kty"] == "EC"
    oidc = issuers[oidc_issuer.url]
    assert not oidc.service_accounts and oidc.keys[0]["kty"] == "RSA"
    assert (oidc.username_claim, oidc.groups_claim) == ("email", "groups")


def token(kube, account: str, audience: str = "atlas") -> str:
    """A real token from the API server's TokenRequest API."""
    return kube("create", "token", account, "--audience", audience).stdout.strip()


def test_a_service_account_token_is_its_atlaskey_and_refused_within_a_minute_of_its_deletion(
    kube, gateway, redis_client, record
):
    kube("create", "serviceaccount", "runner")
    kube.apply(key_manifest("batch", subjects=[sa_subject("runner")], limits={"tokensPerDay": 100000}))
    first = uid_of(kube, "runner")
    wait_until("the account's UID published", lambda: published_uid(redis_client, kube.ns, "runner") == first, 30)
    assert binding(redis_client, f"ServiceAccount:{kube.ns}/runner") == f"{kube.ns}/batch"
    old = token(kube, "runner")
    status, body = wait_until("the token served", lambda: (r := gateway.chat(old))[0] == 200 and r, 30)
    assert body["usage"]["total_tokens"] > 0
    wait_until(
        "the request in the AtlasKey's usage",
        lambda: (
            (u := ((kube.get("atlaskey", "batch") or {}).get("status") or {}).get("usage") or {}).get("requestsToday")
            == 1
            and u.get("tokensToday") == body["usage"]["total_tokens"]
        ),
        30,
    )

    started = time.monotonic()
    kube("delete", "serviceaccount", "runner")
    wait_until(
        "the deleted account's UID gone",
        lambda: published_uid(redis_client, kube.ns, "runner") is None,
        REFUSAL_DEADLINE,
    )
    record("service_account_deleted_to_unpublished", time.monotonic() - started)
    status, body = wait_until(
        "the deleted account's token refused",
        lambda: (r := gateway.chat(old))[0] != 200 and r,
        REFUSAL_DEADLINE - (time.monotonic() - started),
    )
    record("service_account_deleted_to_token_refused", time.monotonic() - started)
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    assert f"ServiceAccount {kube.ns}/runner no longer exists" in body["error"]["message"]

    kube("create", "serviceaccount", "runner")
    second = uid_of(kube, "runner")
    assert second != first
    wait_until(
        "the recreated account's new UID",
        lambda: published_uid(redis_client, kube.ns, "runner") == second,
        REFUSAL_DEADLINE,
    )
    fresh = token(kube, "runner")
    wait_until("the recreated account's token served", lambda: gateway.chat(fresh)[0] == 200, 30)
    assert gateway.chat(old)[0] == 401  # issued for the account that was deleted


def test_real_tokens_that_must_not_pass(kube, gateway):
    kube("create", "serviceaccount", "bound")
    kube("create", "serviceaccount", "unbound")
    kube.apply(key_manifest("bound", subjects=[sa_subject("bound")]))
    good = token(kube, "bound")
    wait_until("the bound account's token served", lambda: gateway.chat(good)[0] == 200, 30)
    unbound = token(kube, "unbound")
    cases = {
        "another audience": (token(kube, "bound", "kubernetes"), "audience is not this gateway's"),
        "an unbound account": (unbound, f"No AtlasKey binds ServiceAccount {kube.ns}/unbound"),
        # the bound account's claims under another token's (real, same key) signature
        "a forged signature": (good[: good.rindex(".")] + unbound[unbound.rindex(".") :], "signature does not verify"),
        "alg none": (
            good.split(".")[0].replace(good.split(".")[0], "eyJhbGciOiJub25lIn0") + "." + good.split(".")[1] + ".",
            "algorithm 'none' is not accepted",
        ),
        "malformed": ("eyJhbGciOiJFUzI1NiJ9.bm90IGpzb24.x", "not a well-formed JWT"),
    }
    for case, (bad, expected) in cases.items():
        status, body = gateway.chat(bad)
        assert status == 401, (case, status, body)
        assert body["error"]["code"] == "invalid_api_key" and expected in body["error"]["message"], (case, body)
        assert bad not in body["error"]["message"]


def test_oidc_tokens_of_a_bound_user_and_group(kube, gateway, oidc_issuer):
    kube.apply(key_manifest("alice", subjects=[{"kind": "User", "name": "alice@example.com"}]))
    kube.apply(key_manifest("search", subjects=[{"kind": "Group", "name": "team-search"}]))
    alice = oidc_issuer.id_token("alice", {"email": "alice@example.com", "email_verified": True, "groups": ["x"]})
    bob = oidc_issuer.id_token("bob", {"email": "bob@example.com", "email_verified": True, "groups": ["team-search"]})
    unverified = oidc_issuer.id_token("mallory", {"email": "alice@example.com", "email_verified": False})
    wait_until("alice's token served", lambda: gateway.chat(alice)[0] == 200, 30)
    wait_until("bob's token served by his group", lambda: gateway.chat(bob)[0] == 200, 30)
    status, body = gateway.chat(unverified)
    assert status == 401 and "not verified" in body["error"]["message"]


def test_a_subject_bound_twice_is_a_conflict_on_the_later_key_until_the_first_lets_go(kube, redis_client):
    kube("create", "serviceaccount", "shared")
    kube.apply(key_manifest("first", subjects=[sa_subject("shared")]))
    wait_until(
        "first binds it", lambda: binding(redis_client, f"ServiceAccount:{kube.ns}/shared") == f"{kube.ns}/first", 30
    )
    kube.apply(key_manifest("second", subjects=[sa_subject("shared"), {"kind": "User", "name": "bob@example.com"}]))
    stalled = wait_until(
        "Stalled=True/SubjectConflict on the later key",
        lambda: (c := kube.condition("atlaskey", "second", "Stalled")).get("reason") == "SubjectConflict" and c,
        30,
    )
    assert stalled["status"] == "True"
    assert f"ServiceAccount {kube.ns}/shared is bound by AtlasKey {kube.ns}/first" in stalled["message"]
    assert kube.condition("atlaskey", "second")["status"] == "False"  # Ready
    assert kube.condition("atlaskey", "second", "Serving")["status"] == "True"  # its Secret's key works
    assert kube.condition("atlaskey", "first")["status"] == "True"
    assert kube.condition("atlaskey", "first", "Stalled") == {}
    assert binding(redis_client, "User:bob@example.com") == f"{kube.ns}/second"  # its other subject works

    kube("delete", "atlaskey", "first")
    wait_until(
        "the later key takes the subject over",
        lambda: binding(redis_client, f"ServiceAccount:{kube.ns}/shared") == f"{kube.ns}/second",
        30,
    )
    wait_until(
        "and its conflict ends",
        lambda: (
            kube.condition("atlaskey", "second").get("status") == "True"
            and kube.condition("atlaskey", "second", "Stalled") == {}
        ),
        30,
    )
