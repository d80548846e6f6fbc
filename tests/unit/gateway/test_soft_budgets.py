"""Soft budgets in the gateway: what /v1/usage shows of them."""

from __future__ import annotations

from atlas_core import contract
from atlas_gateway.handlers.usage_report import _soft


def test_usage_report_names_the_soft_budget_passed_and_what_each_leaves():
    limits = contract.Limits(tokens_per_day=1000, soft_tokens_per_day=800, soft_cost_per_month=2.5)
    usage = contract.Usage(tokens_today=300, tokens_this_month=9000, cost_this_month=1_000_000)
    assert _soft(limits, usage) == {"demoted": None, "remainingBeforeDemotion": {
        "tokensToday": 500, "tokensThisMonth": None, "costThisMonth": "1.5"}}
    usage = contract.Usage(tokens_today=800, tokens_this_month=9000, cost_this_month=2_600_000)
    assert _soft(limits, usage) == {"demoted": "softTokensPerDay", "remainingBeforeDemotion": {
        "tokensToday": 0, "tokensThisMonth": None, "costThisMonth": "0"}}
    assert _soft(contract.Limits(tokens_per_day=5), usage) == {
        "demoted": None, "remainingBeforeDemotion": {"tokensToday": None, "tokensThisMonth": None}}
