"""Table-driven CRD validation against the real kube-apiserver (schema, formats, CEL).

One manifest per case in testdata/; a valid case must be accepted by `kubectl apply`, an
invalid one refused with a message containing the expected substring (which names the field).
Modelled on envoyproxy/ai-gateway's tests/crdcel.
"""

from __future__ import annotations

import json
import secrets
from pathlib import Path

import pytest

TESTDATA = Path(__file__).parent / "testdata"

VALID = [
    "key_minimal",
    "key_full",
    "key_burst_equals_rps",
    "key_fractional_rps",
    "key_long_name_with_secret_name",
    "key_grace_valid",
    "key_grace_compound",
    "key_grace_zero",
    "quota_full",
    "quota_empty",
    "key_shrink_full",
    "quota_shrink_month",
    "pricelist_full",
    "key_cost_budget",
    "key_soft_budgets",
    "quota_soft_only",
    "key_subjects_full",
]

INVALID = {
    "key_rps_zero": "spec.limits.requestsPerSecond: Invalid value: 0: spec.limits.requestsPerSecond in body should be greater than 0",
    "key_rps_negative": "spec.limits.requestsPerSecond: Invalid value: -1",
    "key_burst_zero": "spec.limits.burst: Invalid value: 0: spec.limits.burst in body should be greater than or equal to 1",
    "key_burst_below_rps": "spec.limits.burst: Invalid value: burst must be >= requestsPerSecond",
    "key_burst_without_rps": "spec.limits.burst: Invalid value: burst requires requestsPerSecond",
    "key_burst_fraction": 'spec.limits.burst: Invalid value: "number": spec.limits.burst in body must be of type integer',
    "key_tokens_per_minute_zero": "spec.limits.tokensPerMinute: Invalid value: 0",
    "key_tokens_per_day_string": 'spec.limits.tokensPerDay: Invalid value: "string": spec.limits.tokensPerDay in body must be of type integer',
    "key_tokens_per_month_too_large": "spec.limits.tokensPerMonth: Invalid value: 1000000000000001",
    "key_month_below_day": "spec.limits.tokensPerMonth: Invalid value: tokensPerMonth must be >= tokensPerDay",
    "key_max_concurrent_zero": "spec.limits.maxConcurrent: Invalid value: 0",
    "key_unknown_limit": 'unknown field "spec.limits.tokensPerHour"',
    "key_priority_invalid": 'spec.priority: Unsupported value: "Urgent"',
    "key_suspended_string": 'spec.suspended: Invalid value: "string": spec.suspended in body must be of type boolean',
    "key_expires_not_a_time": 'spec.expiresAt: Invalid value: "next tuesday": spec.expiresAt in body must be of type date-time',
    "key_secret_name_invalid": 'spec.secretName: Invalid value: "Not_A_Name"',
    "key_quota_ref_invalid": 'spec.quotaRef: Invalid value: "team search"',
    "key_models_duplicate": 'spec.models[1]: Duplicate value: "qwen2.5-*"',
    "key_models_whitespace": 'spec.models[0]: Invalid value: "llama 3"',
    "key_models_empty_string": 'spec.models[0]: Invalid value: ""',
    "key_grace_words": 'spec.rotationGracePeriod: Invalid value: "10 minutes": spec.rotationGracePeriod in body should match',
    "key_grace_no_unit": 'spec.rotationGracePeriod: Invalid value: "600"',
    "key_grace_days": 'spec.rotationGracePeriod: Invalid value: "2d"',
    "key_grace_too_long": 'spec.rotationGracePeriod: Invalid value: "721h": rotationGracePeriod must be at most 720h',
    "key_name_too_long_for_secret": "metadata.name must be at most 245 characters when spec.secretName is not set",
    "quota_burst_below_rps": "spec.limits.burst: Invalid value: burst must be >= requestsPerSecond",
    "quota_tokens_per_day_zero": "spec.limits.tokensPerDay: Invalid value: 0",
    "quota_month_below_day": "spec.limits.tokensPerMonth: Invalid value: tokensPerMonth must be >= tokensPerDay",
    "quota_unknown_field": 'unknown field "spec.keys"',
    "key_shortfall_invalid": 'spec.onBudgetShortfall: Unsupported value: "Truncate"',
    "key_min_completion_without_shrink": "spec.minCompletionTokens: Invalid value: minCompletionTokens applies only with onBudgetShortfall Shrink",
    "key_shrink_without_budget": "spec.onBudgetShortfall: Invalid value: onBudgetShortfall Shrink needs a "
    "limits.tokensPerDay or limits.tokensPerMonth budget",
    "key_min_completion_zero": "spec.minCompletionTokens: Invalid value: 0",
    "quota_min_completion_above_day": "spec.minCompletionTokens: Invalid value: minCompletionTokens must be below limits.tokensPerDay",
    "pricelist_negative_price": "spec.prices[0].input: Invalid value: -0.1: spec.prices[0].input in body should be "
    "greater than or equal to 0",
    "pricelist_duplicate_model": 'spec.prices[1]: Duplicate value: {"model":"qwen2.5-*"}',
    "pricelist_bad_currency": 'spec.currency: Invalid value: "usd": spec.currency in body should match',
    "pricelist_default_negative": "spec.default.output: Invalid value: -2",
    "key_cost_without_price_list": "spec.priceListRef: Required value: limits.costPerDay, costPerMonth, "
    "softCostPerDay and softCostPerMonth need spec.priceListRef",
    "key_cost_negative": "spec.limits.costPerDay: Invalid value: -1",
    "key_soft_day_not_below_hard": "spec.limits.softTokensPerDay: Invalid value: softTokensPerDay must be below tokensPerDay",
    "quota_soft_month_above_hard": "spec.limits.softTokensPerMonth: Invalid value: softTokensPerMonth must be below tokensPerMonth",
    "key_soft_cost_not_below_hard": "spec.limits.softCostPerDay: Invalid value: softCostPerDay must be below costPerDay",
    "quota_soft_cost_month_not_below_hard": "spec.limits.softCostPerMonth: Invalid value: softCostPerMonth must be below costPerMonth",
    "key_soft_cost_without_price_list": "spec.priceListRef: Required value: limits.costPerDay, costPerMonth, "
    "softCostPerDay and softCostPerMonth need spec.priceListRef",
    "key_soft_tokens_zero": "spec.limits.softTokensPerDay: Invalid value: 0",
    "quota_cost_month_below_day": "spec.limits.costPerMonth: Invalid value: costPerMonth must be >= costPerDay",
    "key_subject_kind_invalid": 'spec.subjects[1].kind: Unsupported value: "Pod": supported values: "ServiceAccount", "User", "Group"',
    "key_subject_namespace_on_user": "spec.subjects[1].namespace: Forbidden: namespace applies only to kind ServiceAccount",
    "key_subject_sa_name_invalid": "spec.subjects[0].name: Invalid value: a ServiceAccount name must be a lowercase DNS subdomain",
    "key_subject_namespace_invalid": 'spec.subjects[0].namespace: Invalid value: "Jobs.Prod"',
    "key_subject_name_missing": "spec.subjects[0].name: Required value",
    "key_subject_name_padded": 'spec.subjects[0].name: Invalid value: " alice"',
    "key_subject_api_group_wrong": 'spec.subjects[1].apiGroup: Invalid value: apiGroup must be "" for kind ServiceAccount',
}


def test_every_testdata_file_is_in_the_table():
    files = {p.stem for p in TESTDATA.glob("*.yaml")}
    assert files == set(VALID) | set(INVALID)


@pytest.fixture(scope="module")
def crd_namespace(control_plane):
    name = f"crdcel-{secrets.token_hex(3)}"
    control_plane.kubectl("create", "namespace", name)
    yield name
    control_plane.kubectl("delete", "namespace", name, "--wait=false", check=False)


@pytest.mark.cluster
@pytest.mark.parametrize("case", VALID)
def test_valid_manifest_is_accepted(kubectl, crd_namespace, case):
    result = kubectl("apply", "-n", crd_namespace, "-f", str(TESTDATA / f"{case}.yaml"), check=False)
    assert result.returncode == 0, result.stderr


@pytest.mark.cluster
def test_defaults_are_applied(kubectl, crd_namespace):
    kubectl("apply", "-n", crd_namespace, "-f", str(TESTDATA / "key_minimal.yaml"))
    obj = json.loads(kubectl("get", "atlaskey", "key-minimal", "-n", crd_namespace, "-o", "json").stdout)
    assert obj["spec"] == {"priority": "Standard", "suspended": False}


@pytest.mark.cluster
@pytest.mark.parametrize("case", sorted(INVALID))
def test_invalid_manifest_is_refused_naming_the_field(kubectl, crd_namespace, case):
    result = kubectl("apply", "-n", crd_namespace, "-f", str(TESTDATA / f"{case}.yaml"), check=False)
    assert result.returncode != 0, f"{case} was accepted"
    assert INVALID[case] in result.stderr, result.stderr


@pytest.mark.cluster
def test_printer_columns_and_short_names(kubectl, crd_namespace):
    for case in ("quota_full", "key_minimal"):
        kubectl("apply", "-n", crd_namespace, "-f", str(TESTDATA / f"{case}.yaml"))
    keys = kubectl("get", "ak", "-n", crd_namespace).stdout.splitlines()[0].split()
    assert keys[:2] == ["NAME", "QUOTA"] and "PRIORITY" in keys and "READY" in keys and "AGE" in keys
    assert " ".join(keys).count("TOKENS") == 3
    quotas = kubectl("get", "aq", "-n", crd_namespace).stdout.splitlines()[0].split()
    assert quotas[:2] == ["NAME", "KEYS"] and "READY" in quotas
    names = kubectl("get", "atlas", "-n", crd_namespace, "-o", "name").stdout.split()
    assert "atlasquota.atlas.bugvanquisher.io/quota-full" in names
    assert "atlaskey.atlas.bugvanquisher.io/key-minimal" in names
