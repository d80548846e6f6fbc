"""Soft budgets with the real operator (chart RBAC), kube-apiserver, Redis and gateway: past an
AtlasQuota's softTokensPerDay its key's requests are admitted demoted (x-atlas-demoted), the
quota and the key show Demoted=True while it lasts, and Argo CD, kstatus and Flux still read
both as working; raising the soft budget ends it."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.fixtures.gitops_health import gitops_health

from .procs import key_manifest, wait_until

pytestmark = pytest.mark.cluster


@pytest.fixture(autouse=True)
def _stack(operator, gateway):
    """Every test here needs the operator and the gateway running."""


def quota(soft: int) -> str:
    return json.dumps(
        {
            "apiVersion": "atlas.bugvanquisher.io/v1alpha1",
            "kind": "AtlasQuota",
            "metadata": {"name": "batch-team"},
            "spec": {"limits": {"tokensPerDay": 1_000_000, "softTokensPerDay": soft}},
        }
    )


def chat(gateway, key: str) -> httpx.Response:
    return httpx.post(
        gateway.url + "/v1/chat/completions",
        timeout=10,
        headers={"authorization": f"Bearer {key}"},
        json={"model": "llama-3.1-8b-instruct", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]},
    )


def test_past_a_soft_budget_the_key_is_demoted_shown_and_still_healthy(kube, gateway, tmp_path):
    kube.apply(quota(20))
    kube.apply(key_manifest("nightly", quotaRef="batch-team", priority="Critical"))
    key = wait_until("the generated Secret", lambda: kube.secret_key("nightly-api-key"), 30)
    wait_until("served", lambda: chat(gateway, key).status_code == 200, 30)
    wait_until(
        "Demoted=False on the key (its quota has a soft budget)",
        lambda: kube.condition("atlaskey", "nightly", "Demoted").get("status") == "False",
        30,
    )

    # each answer settles about 13 tokens (mock upstream): 20 are soon reached
    owner = f'softTokensPerDay; owner="AtlasQuota {kube.ns}/batch-team"'
    demoted = wait_until(
        "a demoted answer", lambda: (r := chat(gateway, key)).headers.get("x-atlas-demoted") == owner and r, 30
    )
    assert demoted.status_code == 200
    kube("wait", "--for=condition=Demoted", "atlasquota/batch-team", "atlaskey/nightly", "--timeout=30s")
    shown = kube.condition("atlaskey", "nightly", "Demoted")
    assert shown["reason"] == "SharedQuotaSoftBudgetPassed"
    assert shown["message"].startswith("AtlasQuota 'batch-team': softTokensPerDay (20) is passed for ")
    assert kube.condition("atlasquota", "batch-team", "Demoted")["reason"] == "SoftTokensPerDayPassed"
    objects = [kube.get("atlaskey", "nightly"), kube.get("atlasquota", "batch-team")]
    for got in gitops_health(objects, tmp_path):
        assert (got["argocd"]["status"], got["kstatus"]["status"], got["flux"]["status"]) == (
            "Healthy",
            "Current",
            "Current",
        ), got
        assert "softTokensPerDay (20) is passed" in got["argocd"]["message"]  # Argo CD's message says why

    # a higher soft budget: no longer passed, the condition turns False and answers are not demoted
    kube.apply(quota(1_000))
    wait_until("Demoted=False", lambda: kube.condition("atlaskey", "nightly", "Demoted").get("status") == "False", 30)
    wait_until("answers not demoted", lambda: "x-atlas-demoted" not in chat(gateway, key).headers, 30)
