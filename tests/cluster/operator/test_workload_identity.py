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
    issuers = wait_until("both issuers published", lambda: (
        found := {k.decode(): contract.Issuer.decode(v) for k, v in redis_client.hgetall(contract.IDENTITY_ISSUERS).items()}
    ) and len(found) == 2 and found, 30)
    cluster = issuers[control_plane.server]
    assert cluster.service_accounts and cluster.keys and cluster.keys[0]["kty"] == "EC"
    oidc = issuers[oidc_issuer.url]
    assert not oidc.service_accounts and oidc.keys[0]["kty"] == "RSA"
    assert (oidc.username_claim, oidc.groups_claim) == ("email", "groups")


def test_a_deleted_or_recreated_service_account_is_unpublished_within_a_minute(kube, redis_client, record):
    kube("create", "serviceaccount", "runner")
    kube.apply(key_manifest("batch", subjects=[sa_subject("runner")]))
    first = uid_of(kube, "runner")
    wait_until("the account's UID published", lambda: published_uid(redis_client, kube.ns, "runner") == first, 30)
    assert binding(redis_client, f"ServiceAccount:{kube.ns}/runner") == f"{kube.ns}/batch"

    started = time.monotonic()
    kube("delete", "serviceaccount", "runner")
    wait_until("the deleted account's UID gone", lambda: published_uid(redis_client, kube.ns, "runner") is None,
               REFUSAL_DEADLINE)
    record("service_account_deleted_to_unpublished", time.monotonic() - started)

    kube("create", "serviceaccount", "runner")
    second = uid_of(kube, "runner")
    assert second != first
    wait_until("the recreated account's new UID", lambda: published_uid(redis_client, kube.ns, "runner") == second,
               REFUSAL_DEADLINE)


def test_a_subject_bound_twice_is_a_conflict_on_the_later_key_until_the_first_lets_go(kube, redis_client):
    kube("create", "serviceaccount", "shared")
    kube.apply(key_manifest("first", subjects=[sa_subject("shared")]))
    wait_until("first binds it", lambda: binding(redis_client, f"ServiceAccount:{kube.ns}/shared") == f"{kube.ns}/first", 30)
    kube.apply(key_manifest("second", subjects=[sa_subject("shared"), {"kind": "User", "name": "bob@example.com"}]))
    stalled = wait_until("Stalled=True/SubjectConflict on the later key", lambda: (
        c := kube.condition("atlaskey", "second", "Stalled")).get("reason") == "SubjectConflict" and c, 30)
    assert stalled["status"] == "True"
    assert f"ServiceAccount {kube.ns}/shared is bound by AtlasKey {kube.ns}/first" in stalled["message"]
    assert kube.condition("atlaskey", "second")["status"] == "False"  # Ready
    assert kube.condition("atlaskey", "second", "Serving")["status"] == "True"  # its Secret's key works
    assert kube.condition("atlaskey", "first")["status"] == "True"
    assert kube.condition("atlaskey", "first", "Stalled") == {}
    assert binding(redis_client, "User:bob@example.com") == f"{kube.ns}/second"  # its other subject works

    kube("delete", "atlaskey", "first")
    wait_until("the later key takes the subject over",
               lambda: binding(redis_client, f"ServiceAccount:{kube.ns}/shared") == f"{kube.ns}/second", 30)
    wait_until("and its conflict ends", lambda: kube.condition("atlaskey", "second").get("status") == "True"
               and kube.condition("atlaskey", "second", "Stalled") == {}, 30)
