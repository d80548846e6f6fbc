"""The chart's health checks (files/gitops/) read by Argo CD's Lua interpreter, kstatus and Flux's
healthCheckExprs evaluator, the real ones (hack/tools/health/): every state an Atlas object can be
in, as the operator writes it (docs/gitops.md). tests/cluster/operator/test_gitops_health.py runs
them on objects the real operator wrote."""

from __future__ import annotations

import pytest

from tests.fixtures.gitops_health import gitops_health

API = "atlas.bugvanquisher.io/v1alpha1"


def cond(ctype: str, status: bool, reason: str, message: str = "") -> dict:
    return {
        "type": ctype,
        "status": "True" if status else "False",
        "reason": reason,
        "message": message,
        "lastTransitionTime": "2026-11-27T10:00:00Z",
        "observedGeneration": 1,
    }


def obj(kind: str, conditions: list[dict] | None, generation: int = 1, observed: int | None = 1, **meta) -> dict:
    status = {} if observed is None else {"observedGeneration": observed}
    if conditions is not None:
        status["conditions"] = conditions
    return {
        "apiVersion": API,
        "kind": kind,
        "metadata": {"name": "x", "namespace": "ns", "generation": generation, **meta},
        "spec": {},
        "status": status,
    }


ACTIVE = [
    cond("Ready", True, "Active", "the key is accepted by the gateway"),
    cond("Serving", True, "Active", "the gateway accepts the key"),
]
# name: (object, Argo CD, kstatus, Flux)
CASES = {
    "not yet processed": (obj("AtlasKey", None, observed=0), "Progressing", "InProgress", "InProgress"),
    "a new generation not yet processed": (
        obj("AtlasKey", ACTIVE, generation=2),
        "Progressing",
        "InProgress",
        "InProgress",
    ),
    "a working key": (obj("AtlasKey", ACTIVE), "Healthy", "Current", "Current"),
    "quotaRef to nothing": (
        obj(
            "AtlasKey",
            [
                cond("Ready", False, "QuotaNotFound", "AtlasQuota 'q' not found"),
                cond("Stalled", True, "QuotaNotFound", "AtlasQuota 'q' not found"),
                cond("Serving", False, "QuotaNotFound", "the gateway refuses the key (403)"),
            ],
        ),
        "Degraded",
        "Failed",
        "Failed",
    ),
    "suspended on purpose": (
        obj(
            "AtlasKey",
            [
                cond("Ready", True, "Suspended", "spec.suspended is true"),
                cond("Serving", False, "Suspended", "spec.suspended is true: the gateway refuses the key (403)"),
            ],
        ),
        "Suspended",
        "Current",
        "Current",
    ),
    "expired": (
        obj(
            "AtlasKey",
            [
                cond("Ready", True, "Expired", "the key expired at 2026-01-01T00:00:00Z"),
                cond("Serving", False, "Expired", "the gateway refuses the key (403)"),
            ],
        ),
        "Suspended",
        "Current",
        "Current",
    ),
    "a spent budget": (
        obj("AtlasKey", ACTIVE + [cond("QuotaExhausted", True, "DailyBudgetSpent", "tokensPerDay")]),
        "Healthy",
        "Current",
        "Current",
    ),
    "past a soft budget": (
        obj(
            "AtlasKey",
            ACTIVE
            + [
                cond("Demoted", True, "SharedQuotaSoftBudgetPassed", "AtlasQuota 'q': softTokensPerDay (500) is passed")
            ],
        ),
        "Healthy",
        "Current",
        "Current",
    ),
    "a quota": (obj("AtlasQuota", [cond("Ready", True, "Active")]), "Healthy", "Current", "Current"),
    "a quota past its soft budget": (
        obj("AtlasQuota", [cond("Ready", True, "Active"), cond("Demoted", True, "SoftCostPerMonthPassed", "40")]),
        "Healthy",
        "Current",
        "Current",
    ),
    "a quota pricing from nothing": (
        obj(
            "AtlasQuota",
            [
                cond("Ready", False, "PriceListNotFound", "AtlasPriceList 'p' not found"),
                cond("Stalled", True, "PriceListNotFound", "AtlasPriceList 'p' not found"),
            ],
        ),
        "Degraded",
        "Failed",
        "Failed",
    ),
    "a price list": (
        obj("AtlasPriceList", [cond("Ready", True, "Active", "prices 2 model patterns")]),
        "Healthy",
        "Current",
        "Current",
    ),
}


@pytest.fixture(scope="module")
def verdicts(tmp_path_factory):
    names = list(CASES)
    found = gitops_health([CASES[n][0] for n in names], tmp_path_factory.mktemp("health"))
    return dict(zip(names, found))


@pytest.mark.parametrize("case", list(CASES))
def test_argocd_kstatus_and_flux_read_each_state_as_designed(verdicts, case):
    _, argocd, kstatus, flux = CASES[case]
    got = verdicts[case]
    assert not any("error" in v for v in got.values()), got
    assert (got["argocd"]["status"], got["kstatus"]["status"], got["flux"]["status"]) == (argocd, kstatus, flux)


def test_messages_say_why(verdicts):
    assert verdicts["quotaRef to nothing"]["argocd"]["message"] == "QuotaNotFound: AtlasQuota 'q' not found"
    assert verdicts["quotaRef to nothing"]["kstatus"]["message"] == "AtlasQuota 'q' not found"
    assert "refuses the key" in verdicts["suspended on purpose"]["argocd"]["message"]
    assert "DailyBudgetSpent" in verdicts["a spent budget"]["argocd"]["message"]
    assert "SharedQuotaSoftBudgetPassed" in verdicts["past a soft budget"]["argocd"]["message"]
    assert "generation 2" in verdicts["a new generation not yet processed"]["argocd"]["message"]
