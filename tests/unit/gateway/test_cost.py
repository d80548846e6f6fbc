"""Cost-weighted budgets: price matching, micro-unit maths, and admit/settle/undo on fakeredis."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

from atlas_core import contract
from atlas_gateway.auth.principal import Principal
from atlas_gateway.http import errors
from atlas_gateway.ledger import admission as adm
from atlas_gateway.ledger import limits
from atlas_gateway.ledger.script_args import cost_args
from atlas_gateway.metering.usage import cached_tokens

KEY = contract.key_subject("team", "app")
QUOTA = contract.quota_subject("team", "shared")

TABLE = contract.PriceTable.from_spec(
    "prices",
    {
        "currency": "USD",
        "prices": [
            {"model": "gpt-4o-mini*", "input": 0.15, "cachedInput": 0.075, "output": 0.6},
            {"model": "gpt-4o*", "input": 2.5, "output": 10},
        ],
    },
)
WITH_DEFAULT = contract.PriceTable.from_spec(
    "prices",
    {
        "currency": "EUR",
        "prices": [],
        "default": {"input": 1, "output": 2},
    },
)


def principal(limits: contract.Limits, table=TABLE, quota_limits=None, quota_table=None) -> Principal:
    key = contract.KeyConfig(
        "team", "app", "0123abcd", limits, quota="shared" if quota_limits else None, price_list=table
    )
    quota = contract.QuotaConfig("team", "shared", quota_limits, price_list=quota_table) if quota_limits else None
    return Principal(key, quota)


def test_first_matching_glob_wins_then_default():
    assert TABLE.price_of("gpt-4o-mini-2024").input == 150_000  # not the later gpt-4o*
    assert TABLE.price_of("gpt-4o").output == 10_000_000
    assert TABLE.price_of("llama") is None
    assert WITH_DEFAULT.price_of("anything").output == 2_000_000
    assert TABLE.price_of("gpt-4o").cached_input == 2_500_000  # cachedInput defaults to input


def test_micro_unit_maths_is_exact_and_rounds_up():
    price = TABLE.price_of("gpt-4o-mini")
    # 1M prompt tokens at 0.15 = 0.15 USD exactly; 1 token = 0.00000015 USD -> rounds up to 1 micro
    assert price.cost(1_000_000, 0) == 150_000
    assert price.cost(1, 0) == 1
    # 1000 prompt (400 cached) + 500 completion: 600*0.15 + 400*0.075 + 500*0.6 = 420 micro-units (x1e-6 per M)
    assert price.cost(1000, 500, cached=400) == -(-(600 * 150_000 + 400 * 75_000 + 500 * 600_000) // 1_000_000)
    assert contract.format_micro(1_234_567) == "1.234567"
    assert contract.format_micro(1_500_000) == "1.5"
    assert contract.format_micro(0) == "0"
    assert contract.to_micro(0.1) == 100_000 and contract.to_micro("20") == 20_000_000
    # no float drift: ten settlements of 0.1 add up to exactly 1
    assert contract.format_micro(sum(contract.to_micro(0.1) for _ in range(10))) == "1"


def test_cached_tokens_from_each_upstream_dialect():
    assert cached_tokens({"prompt_tokens": 10, "prompt_tokens_details": {"cached_tokens": 4}}) == 4
    assert cached_tokens({"input_tokens": 10, "input_tokens_details": {"cached_tokens": 3}}) == 3
    assert cached_tokens({"input_tokens": 10, "cache_read_input_tokens": 2}) == 2
    assert cached_tokens({"prompt_tokens": 10}) == 0
    assert cached_tokens({"prompt_tokens_details": {"cached_tokens": "junk"}}) == 0


def test_unpriced_principal_does_no_cost_work():
    p = Principal(contract.KeyConfig("team", "app", "0123abcd", contract.Limits(tokens_per_day=10)), None)
    assert p.prices_for("gpt-4o") is None
    assert cost_args(None, 10, 10) == (b"0", b"0")


def test_cost_limited_key_refuses_an_unpriced_model_with_403():
    p = principal(contract.Limits(cost_per_day=1))
    with pytest.raises(errors.GatewayError) as err:
        p.prices_for("llama-3")
    assert err.value.status == 403 and "no price for model 'llama-3'" in err.value.message
    with pytest.raises(errors.GatewayError):  # refused every time: a refusal is not remembered
        p.prices_for("llama-3")
    # priced but not cost-limited: served, counted as 0
    assert principal(contract.Limits()).prices_for("llama-3") == (None,)


def test_prices_are_looked_up_once_per_model_and_the_memory_is_bounded():
    p = principal(contract.Limits(cost_per_day=1))
    first = p.prices_for("gpt-4o")
    assert first[0] is not None and p.prices_for("gpt-4o") is first
    for i in range(Principal._PRICES_KEPT + 10):  # any model names a client sends
        p.prices_for(f"gpt-4o-{i}")
    assert len(p._prices) <= Principal._PRICES_KEPT
    assert p.prices_for("gpt-4o") == first


def test_config_round_trip_keeps_prices():
    key = contract.KeyConfig("team", "app", "0123abcd", contract.Limits(cost_per_day=1.5), price_list=TABLE)
    again = contract.KeyConfig.decode(key.encode())
    assert again.price_list == TABLE and again.limits.cost_per_day == 1.5
    quota = contract.QuotaConfig(
        "team",
        "q",
        price_list=WITH_DEFAULT,
        refusal="PriceListNotFound",
        refusal_message="AtlasPriceList 'p' not found",
    )
    assert contract.QuotaConfig.decode(quota.encode()) == quota


async def test_cost_budget_reserves_settles_and_then_refuses(admission, fake_redis):
    # 0.01 USD a day; gpt-4o: prompt 100 at 2.5/M + cap 300 at 10/M = 250 + 3000 = 3250 micro
    p = principal(contract.Limits(cost_per_day=0.01))
    prices = p.prices_for("gpt-4o")
    reserve_costs = cost_args(prices, 100, 300)
    assert reserve_costs == (b"3250", b"0")
    first = await admission.admit(p, "r1", 400, 100, 1, reserve_costs)
    assert first.admitted
    lease_cost = await fake_redis.hgetall(contract.lease_cost_key(KEY))
    assert lease_cost == {b"r1": b"3250"}
    # two more fit (3 x 3250 = 9750 <= 10000), the fourth does not while all are in flight
    assert (await admission.admit(p, "r2", 400, 100, 1, reserve_costs)).admitted
    assert (await admission.admit(p, "r3", 400, 100, 1, reserve_costs)).admitted
    refused = await admission.admit(p, "r4", 400, 100, 1, reserve_costs)
    assert not refused.admitted and refused.reason == limits.COST_DAY
    # settle r1 from real usage: 100 prompt (50 cached: cachedInput = input for gpt-4o) + 20 output
    await admission.settle(p, "r1", 400, 120, cost_args(prices, 100, 20, cached=50))
    now = datetime.now(timezone.utc)
    usage = (await contract.read_usages(fake_redis, [KEY], now))[KEY]
    assert usage.cost_today == 450 and usage.cost_this_month == 450  # 250 + 200
    assert usage.to_status()["costToday"] == "0.00045"
    assert await fake_redis.hgetall(contract.lease_cost_key(KEY)) == {b"r2": b"3250", b"r3": b"3250"}
    # settled 450 + live r2, r3 (6500) + 3250 = 10200 > 10000: still refused, and nothing written
    refused = await admission.admit(p, "r5", 400, 100, 1, reserve_costs)
    assert not refused.admitted and refused.reason == limits.COST_DAY
    err = adm.rejection(refused, p, 400)
    assert err.status == 429 and err.code == "insufficient_quota" and "Daily cost budget" in err.message


async def test_cost_budget_arithmetic_is_exact(admission, fake_redis):
    p = principal(contract.Limits(cost_per_day=0.001))  # 1000 micro
    costs = (b"400", b"0")
    assert (await admission.admit(p, "a", 10, 10, 0, costs)).admitted
    assert (await admission.admit(p, "b", 10, 10, 0, costs)).admitted
    refused = await admission.admit(p, "c", 10, 10, 0, costs)  # 800 + 400 > 1000
    assert not refused.admitted and refused.reason == limits.COST_DAY
    await admission.settle(p, "a", 10, 10, (b"100", b"0"))  # real cost far below the reservation
    assert (await admission.admit(p, "c", 10, 10, 0, costs)).admitted  # 100 + 400 + 400 <= 1000
    refused = await admission.admit(p, "d", 10, 10, 0, (b"101", b"0"))  # 900 + 101 > 1000
    assert not refused.admitted
    assert (await admission.admit(p, "d", 10, 10, 0, (b"100", b"0"))).admitted  # exactly 1000


async def test_quota_cost_budget_in_its_own_price_list(admission, fake_redis):
    p = principal(
        contract.Limits(), table=None, quota_limits=contract.Limits(cost_per_month=0.000003), quota_table=WITH_DEFAULT
    )
    prices = p.prices_for("any-model")
    assert prices[0] is None and prices[1].input == 1_000_000
    costs = cost_args(prices, 2, 0)  # 2 tokens at 1 EUR/M = 2 micro
    assert costs == (b"0", b"2")
    assert (await admission.admit(p, "q1", 2, 2, 0, costs)).admitted
    refused = await admission.admit(p, "q2", 2, 2, 0, costs)
    assert not refused.admitted and refused.reason == limits.COST_MONTH and refused.subject == 2
    err = adm.rejection(refused, p, 2)
    assert err.status == 429 and err.code == "insufficient_quota" and "AtlasQuota team/shared" in err.message


async def test_undo_releases_the_cost_reservation(admission, fake_redis):
    p = principal(contract.Limits(cost_per_day=0.001))
    assert (await admission.admit(p, "u1", 10, 10, 0, (b"900", b"0"))).admitted
    assert await admission.undo(p, "u1", 10, 0, admission=True) == 1
    assert await fake_redis.hgetall(contract.lease_cost_key(KEY)) == {}
    assert (await admission.admit(p, "u2", 10, 10, 0, (b"900", b"0"))).admitted


async def test_no_cost_limit_writes_no_cost_keys(admission, fake_redis):
    p = Principal(contract.KeyConfig("team", "app", "0123abcd", contract.Limits(tokens_per_day=1000)), None)
    assert (await admission.admit(p, "n1", 10, 10, 0)).admitted
    await admission.settle(p, "n1", 10, 10)
    assert not await fake_redis.exists(contract.lease_cost_key(KEY))
    usage = (await contract.read_usages(fake_redis, [KEY], datetime.now(timezone.utc)))[KEY]
    assert usage.cost_today is None and "costToday" not in usage.to_status()
