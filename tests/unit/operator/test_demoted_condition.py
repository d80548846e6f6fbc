"""The Demoted condition (soft budgets), written by the usage write-back, called directly."""

from __future__ import annotations

from datetime import datetime, timezone

from atlas_core import contract
from atlas_operator import conditions as cond
from atlas_operator.keys import reconcile_key
from atlas_operator.quotas import reconcile_quota
from atlas_operator.settings import KEYS, QUOTAS
from atlas_operator.usage import usage_cycle
from atlas_operator.views import ObjectView

NOW = datetime(2026, 11, 27, 12, 0, tzinfo=timezone.utc)
TAG = contract.quota_subject("team", "team-search")


async def settle(redis, subject, tokens):
    day_key, month_key = contract.usage_keys(subject, NOW, TAG)
    await redis.hset(day_key, mapping={"settled": tokens, "requests": 1})
    await redis.hset(month_key, mapping={"settled": tokens})


async def setup(kube, redis):
    """team-search demotes past 500 tokens a day; key a past 60 of its own; b and c have none,
    and c has no quota."""
    kube.add(QUOTAS, "team-search", {"limits": {"tokensPerDay": 1000, "softTokensPerDay": 500}})
    await reconcile_quota(kube.get(QUOTAS, "team-search"), kube=kube, redis=redis, key_count=2, now=NOW)
    for name, spec in (
        ("a", {"quotaRef": "team-search", "limits": {"tokensPerDay": 100, "softTokensPerDay": 60}}),
        ("b", {"quotaRef": "team-search"}),
        ("c", {}),
    ):
        kube.add(KEYS, name, spec)
        await reconcile_key(kube.get(KEYS, name), kube=kube, redis=redis, quota_exists=lambda *_: True, now=NOW)


async def cycle(kube, redis) -> dict[str, dict | None]:
    keys = [ObjectView.of(kube.get(KEYS, n)) for n in ("a", "b", "c")]
    await usage_cycle(redis, kube, keys, [ObjectView.of(kube.get(QUOTAS, "team-search"))], NOW)
    shown = {n: cond.find(kube.get(KEYS, n)["status"]["conditions"], cond.DEMOTED) for n in ("a", "b", "c")}
    shown["team-search"] = cond.find(kube.get(QUOTAS, "team-search")["status"]["conditions"], cond.DEMOTED)
    return shown


def state(c: dict | None) -> tuple[str, str] | None:
    return None if c is None else (c["status"], c["reason"])


async def test_demoted_while_a_soft_budget_is_passed_on_the_object_and_on_its_quotas_keys(kube, redis):
    await setup(kube, redis)
    shown = await cycle(kube, redis)
    assert {n: state(c) for n, c in shown.items()} == {
        "a": ("False", cond.WITHIN_SOFT_BUDGET),
        "b": ("False", cond.WITHIN_SOFT_BUDGET),
        "c": None,
        "team-search": ("False", cond.WITHIN_SOFT_BUDGET),
    }

    await settle(redis, contract.key_subject("team", "a"), 60)  # a's own soft budget reached
    shown = await cycle(kube, redis)
    assert state(shown["a"]) == ("True", "SoftTokensPerDayPassed")
    assert shown["a"]["message"] == (
        "softTokensPerDay (60) is passed for 2026-11-27: requests are admitted as Sheddable"
    )
    assert state(shown["b"]) == ("False", cond.WITHIN_SOFT_BUDGET)

    await settle(redis, TAG, 500)  # the quota's: every key bound to it is demoted
    shown = await cycle(kube, redis)
    assert state(shown["team-search"]) == ("True", "SoftTokensPerDayPassed")
    assert state(shown["b"]) == ("True", cond.SHARED_SOFT_BUDGET_PASSED)
    assert shown["b"]["message"].startswith("AtlasQuota 'team-search': softTokensPerDay (500)")
    assert state(shown["a"]) == ("True", "SoftTokensPerDayPassed")  # its own says more
    # still Ready: a demoted key is a working key (kstatus Current, Argo CD Healthy)
    assert cond.find(kube.get(KEYS, "b")["status"]["conditions"], cond.READY)["status"] == "True"

    kube.patches.clear()
    await cycle(kube, redis)
    assert kube.patches == []  # unchanged: no writes


async def test_the_condition_goes_when_the_soft_budgets_do(kube, redis):
    await setup(kube, redis)
    await settle(redis, contract.key_subject("team", "a"), 60)
    assert state((await cycle(kube, redis))["a"]) == ("True", "SoftTokensPerDayPassed")
    kube.update_spec(KEYS, "a", {"quotaRef": "team-search", "limits": {"tokensPerDay": 100}})
    kube.update_spec(QUOTAS, "team-search", {"limits": {"tokensPerDay": 1000}})
    shown = await cycle(kube, redis)
    assert shown["a"] is None and shown["b"] is None and shown["team-search"] is None


def test_cost_soft_budgets_are_compared_in_micro_units():
    from atlas_operator.usage import demotion

    limits = contract.Limits(soft_cost_per_month=2.5)
    usage = contract.Usage(day="2026-11-27", month="2026-11", cost_this_month=2_499_999)
    assert demotion(limits, usage)[0] is False
    passed = demotion(limits, contract.Usage(day="2026-11-27", month="2026-11", cost_this_month=2_500_000))
    assert passed == (
        True,
        "SoftCostPerMonthPassed",
        "softCostPerMonth (2.5) is passed for 2026-11: requests are admitted as Sheddable",
    )
    assert demotion(contract.Limits(tokens_per_day=5), usage) is None
