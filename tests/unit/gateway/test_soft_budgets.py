"""Soft budgets in the gateway: the admission that demotes (admit.lua on fakeredis), the header
that says so, what /v1/usage shows."""

from __future__ import annotations

from datetime import datetime, timezone

from atlas_core import contract
from atlas_gateway.handlers.usage_report import _soft
from atlas_gateway.ledger import admission as adm
from atlas_gateway.ledger import limits
from atlas_gateway.ledger.script_args import cost_args

from .conftest import make_principal


def test_usage_report_names_the_soft_budget_passed_and_what_each_leaves():
    limits = contract.Limits(tokens_per_day=1000, soft_tokens_per_day=800, soft_cost_per_month=2.5)
    usage = contract.Usage(tokens_today=300, tokens_this_month=9000, cost_this_month=1_000_000)
    assert _soft(limits, usage) == {
        "demoted": None,
        "remainingBeforeDemotion": {"tokensToday": 500, "tokensThisMonth": None, "costThisMonth": "1.5"},
    }
    usage = contract.Usage(tokens_today=800, tokens_this_month=9000, cost_this_month=2_600_000)
    assert _soft(limits, usage) == {
        "demoted": "softTokensPerDay",
        "remainingBeforeDemotion": {"tokensToday": 0, "tokensThisMonth": None, "costThisMonth": "0"},
    }
    assert _soft(contract.Limits(tokens_per_day=5), usage) == {
        "demoted": None,
        "remainingBeforeDemotion": {"tokensToday": None, "tokensThisMonth": None},
    }


# ---------------------------------------------------------------------------- admit.lua on fakeredis

KEY = contract.key_subject("team", "app")
QUOTA = contract.quota_subject("team", "shared")


async def test_once_settled_usage_reaches_a_soft_budget_requests_are_admitted_demoted(admission, fake_redis):
    p = make_principal(contract.Limits(tokens_per_day=1000, soft_tokens_per_day=100))
    first = await admission.admit(p, "r1", 600)  # a reservation is an upper bound: it demotes nothing
    assert first.admitted and first.demoted is None
    await admission.settle(p, "r1", 600, 99)
    assert (await admission.admit(p, "r2", 500)).demoted is None  # settled 99 < 100
    await admission.settle(p, "r2", 500, 1)
    third = await admission.admit(p, "r3", 50)  # settled 100: reached
    assert third.admitted and (third.demoted, third.demoted_by) == ("softTokensPerDay", 1)
    assert adm.demotion_header(third, p) == (b"x-atlas-demoted", b'softTokensPerDay; owner="AtlasKey team/app"')
    # the same figure the operator's condition and /v1/usage read
    usage = (await contract.read_usages(fake_redis, [KEY], datetime.now(timezone.utc)))[KEY]
    assert contract.soft_limit_passed(p.key.limits, usage) == ("softTokensPerDay", 100)


async def test_the_quotas_soft_budget_demotes_every_key_of_it(admission, fake_redis):
    p = make_principal(contract.Limits(soft_tokens_per_day=1000), contract.Limits(soft_tokens_per_month=30))
    assert (await admission.admit(p, "r1", 30)).demoted is None
    await admission.settle(p, "r1", 30, 30)
    demoted = await admission.admit(p, "r2", 1)
    assert demoted.admitted and (demoted.demoted, demoted.demoted_by) == ("softTokensPerMonth", 2)
    assert adm.demotion_header(demoted, p)[1] == b'softTokensPerMonth; owner="AtlasQuota team/shared"'


async def test_while_sheddable_requests_are_shed_a_demoted_one_is_refused_writing_nothing(admission, fake_redis):
    from tests.unit.gateway.test_admission import snapshot

    p = make_principal(contract.Limits(soft_tokens_per_day=10), contract.Limits(max_concurrent=5))
    assert (await admission.admit(p, "r1", 10, shed_if_demoted=True)).admitted  # not demoted: admitted
    await admission.settle(p, "r1", 10, 10)
    before = await snapshot(fake_redis)
    refused = await admission.admit(p, "r2", 5, shed_if_demoted=True)
    assert not refused.admitted and refused.reason == limits.SHED_DEMOTED and refused.demoted == "softTokensPerDay"
    assert await snapshot(fake_redis) == before
    err = adm.rejection(refused, p, 5)
    assert (err.status, err.code, dict(err.headers)[b"retry-after"]) == (503, "overloaded", b"1")
    # without shedding the same request is admitted, demoted
    assert (await admission.admit(p, "r2", 5)).demoted == "softTokensPerDay"


async def test_a_hard_limit_refuses_before_a_soft_one_demotes(admission, fake_redis):
    p = make_principal(contract.Limits(tokens_per_day=100, soft_tokens_per_day=50))
    await admission.admit(p, "r1", 60)
    await admission.settle(p, "r1", 60, 60)
    refused = await admission.admit(p, "r2", 41, shed_if_demoted=True)
    assert not refused.admitted and refused.reason == limits.DAY


async def test_soft_cost_budget_needs_no_hard_one_and_holds_no_lease(admission, fake_redis):
    from tests.unit.gateway.test_cost import principal

    p = principal(contract.Limits(soft_cost_per_day=0.005))
    costs = cost_args(p.prices_for("gpt-4o"), 100, 300)  # 3250 micro-units reserved
    assert (await admission.admit(p, "r1", 400, 100, 1, costs)).demoted is None
    assert await fake_redis.keys("*lease*") == []  # a soft budget reads settled usage only
    await admission.settle(p, "r1", 400, 400, costs)  # settled 3250 < 5000
    assert (await admission.admit(p, "r2", 400, 100, 1, costs)).demoted is None
    await admission.settle(p, "r2", 400, 400, costs)  # 6500 >= 5000
    assert (await admission.admit(p, "r3", 400, 100, 1, costs)).demoted == "softCostPerDay"
    # an unpriced model is no refusal for a soft cost budget: it counts nothing
    assert p.prices_for("llama") == (None,)
