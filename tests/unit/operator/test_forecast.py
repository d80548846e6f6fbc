"""Burn-rate math on synthetic histories, the history's persistence, and the forecast in the
usage write-back (status.forecast, BudgetAtRisk, its Event, and no needless patches)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from atlas_core import contract
from atlas_core.contract import Limits
from atlas_operator import conditions as cond
from atlas_operator import forecast as fc
from atlas_operator.history import History
from atlas_operator.keys import reconcile_key
from atlas_operator.settings import KEYS
from atlas_operator.usage import usage_cycle
from atlas_operator.views import ObjectView
from benchmarks.forecast_accuracy import START, bursty, simulate, steady

PER_HOUR = 60_000


def ms(t: datetime) -> int:
    return int(t.timestamp() * 1000)


# --------------------------------------------------------------------------- synthetic histories


def test_steady_burn_rate_and_exhaustion_are_accurate():
    run = simulate(steady(PER_HOUR), budget=200_000, seconds=3 * 3600)
    settled = [r for t, r in run.rates if t >= 600]
    assert settled and all(abs(r - PER_HOUR) <= 0.03 * PER_HOUR for r in settled)
    late = [e - run.actual_exhaustion for t, e in run.exhausts if t >= 600]
    assert late and all(abs(d) <= 6 * 60 for d in late)  # within 6 minutes of a 3.3 h run


def test_bursty_burn_errs_towards_early_warning():
    run = simulate(bursty(PER_HOUR), budget=200_000, seconds=3 * 3600)
    settled = [r for t, r in run.rates if t >= 600]
    # the faster window wins: never much below the true average, up to the burst rate (5x)
    assert min(settled) >= 0.75 * PER_HOUR and max(settled) <= 5.2 * PER_HOUR
    assert max(settled) >= 3 * PER_HOUR  # the recent window does see the bursts
    late = [e - run.actual_exhaustion for t, e in run.exhausts if t >= 600]
    assert max(late) <= 20 * 60  # never promises much more time than there is


def test_quiet_subject_gets_no_forecast():
    assert simulate(lambda t: 5_000, budget=10_000, seconds=3600).rates == []


def test_no_forecast_from_less_than_a_minute():
    history = History()
    for second in range(0, 60, 10):
        rate = history.observe("k:a/b", ms(START) + second * 1000, "2026-11", second * 100)
        assert rate is None
    assert history.observe("k:a/b", ms(START) + 60_000, "2026-11", 6_000) is not None


def test_subject_that_stopped_loses_its_forecast_after_retention():
    history = History()
    t = START
    used = 0
    for _ in range(30):  # 5 minutes of traffic
        used += 1000
        history.observe("k:a/b", ms(t), "2026-11", used)
        t += timedelta(seconds=10)
    assert history.observe("k:a/b", ms(t), "2026-11", used) is not None
    t += timedelta(seconds=fc.RETENTION + 120)
    assert history.observe("k:a/b", ms(t), "2026-11", used) is None


def test_month_boundary_restarts_the_counter_not_the_rate():
    start = datetime(2026, 11, 30, 23, 30, tzinfo=timezone.utc)
    history = History()
    base = 4_000_000
    rates = []
    for step in range(0, 361):  # one hour, reading every 10 s, across midnight UTC on the 1st
        now = start + timedelta(seconds=10 * step)
        tokens = int(step * 10 * PER_HOUR / 3600)
        month = contract.month_of(now)
        settled = base + tokens if month == "2026-11" else tokens - int(1800 * PER_HOUR / 3600)
        rate = history.observe("k:a/b", ms(now), month, settled)
        if rate is not None and step >= 12:
            rates.append(rate.tokens_per_hour)
    assert rates and all(abs(r - PER_HOUR) <= 0.05 * PER_HOUR for r in rates)
    assert history.samples["k:a/b"][-1].month == "2026-12"


def test_month_budget_at_risk_only_when_it_runs_out_before_the_reset():
    now = datetime(2026, 11, 30, 22, 0, tzinfo=timezone.utc)  # two hours before December
    rate = fc.BurnRate(PER_HOUR / 3600, 300)
    limits = Limits(tokens_per_month=1_000_000)
    later = fc.forecast(rate, fc.token_budgets(limits, 0, 1_000_000 - 3 * PER_HOUR, now), now)
    assert later is not None and later.first is None  # 3 h left, resets in 2 h: not at risk
    sooner = fc.forecast(rate, fc.token_budgets(limits, 0, 1_000_000 - PER_HOUR, now), now)
    assert sooner.first.budget.name == "tokensPerMonth"
    assert sooner.first.at == now + timedelta(hours=1)
    assert fc.next_month(datetime(2026, 12, 15, tzinfo=timezone.utc)) == datetime(2027, 1, 1, tzinfo=timezone.utc)


def test_the_soonest_budget_is_named_and_a_spent_one_runs_out_now():
    now = datetime(2026, 11, 27, 12, 0, tzinfo=timezone.utc)
    rate = fc.BurnRate(1000 / 3600, 300)
    limits = Limits(tokens_per_day=10_000, tokens_per_month=11_000)
    result = fc.forecast(rate, fc.token_budgets(limits, 9_000, 10_500, now), now)
    assert [e.budget.name for e in result.exhaustions] == ["tokensPerMonth", "tokensPerDay"]
    assert result.to_status() == {"tokensPerHour": 1000, "basis": "last 5m", "exhaustsAt": "2026-11-27T12:30:00Z"}
    spent = fc.forecast(rate, fc.token_budgets(Limits(tokens_per_day=10), 10, 10, now), now)
    assert spent.first.at == now


@pytest.mark.parametrize(
    "old,new,changed",
    [
        (None, None, False),
        (None, {"tokensPerHour": 5, "basis": "last 5m"}, True),
        ({"tokensPerHour": 1000, "basis": "last 5m"}, None, True),
        ({"tokensPerHour": 1000, "basis": "last 5m"}, {"tokensPerHour": 1090, "basis": "last 1h"}, False),
        ({"tokensPerHour": 1000, "basis": "last 5m"}, {"tokensPerHour": 1200, "basis": "last 5m"}, False),
        ({"tokensPerHour": 1000, "basis": "last 5m"}, {"tokensPerHour": 1300, "basis": "last 5m"}, True),
        (
            {"tokensPerHour": 1000, "exhaustsAt": "2026-11-27T14:00:00Z"},
            {"tokensPerHour": 1150, "exhaustsAt": "2026-11-27T14:00:00Z"},
            True,
        ),
        (
            {"tokensPerHour": 1000, "exhaustsAt": "2026-11-27T14:00:00Z"},
            {"tokensPerHour": 1000, "exhaustsAt": "2026-11-27T14:05:00Z"},
            False,
        ),  # 5 min of 2 h
        (
            {"tokensPerHour": 1000, "exhaustsAt": "2026-11-27T14:00:00Z"},
            {"tokensPerHour": 1000, "exhaustsAt": "2026-11-27T14:30:00Z"},
            True,
        ),
        ({"tokensPerHour": 1000}, {"tokensPerHour": 1000, "exhaustsAt": "2026-11-27T14:00:00Z"}, True),
    ],
)
def test_only_meaningful_forecast_changes_count(old, new, changed):
    now = datetime(2026, 11, 27, 12, 0, tzinfo=timezone.utc)
    assert fc.changed_meaningfully(old, new, now) is changed


# --------------------------------------------------------------------------- persistence


async def test_history_survives_a_restart_through_redis(redis):
    first = History()
    await first.load(redis, ["k:a/b"])
    t = START
    for step in range(40):
        first.observe("k:a/b", ms(t), "2026-11", step * 200)
        t += timedelta(seconds=10)
    assert first.pending > 0
    await first.flush(redis)
    assert first.pending == 0
    stored = contract.decode_history(await redis.get(contract.history_key("k:a/b")))
    assert stored == first.samples["k:a/b"]  # the baseline too, written with the first change
    assert 0 < await redis.ttl(contract.history_key("k:a/b")) <= contract.HISTORY_TTL_SECONDS

    second = History()  # the restarted operator
    await second.load(redis, ["k:a/b", "k:a/quiet"])
    assert second.samples["k:a/quiet"] == []
    rate = second.observe("k:a/b", ms(t), "2026-11", 40 * 200)
    assert rate is not None and abs(rate.tokens_per_hour - 200 * 360) <= 0.05 * 200 * 360


async def test_quiet_subjects_write_no_history(redis):
    history = History()
    for step in range(20):
        history.observe("k:a/quiet", ms(START) + step * 10_000, "2026-11", 77)
    assert history.pending == 0
    assert await history.flush(redis) == 0


# --------------------------------------------------------------------------- in the write-back


async def _key(kube, redis, limits):
    kube.add(KEYS, "burner", {"limits": limits})
    await reconcile_key(kube.get(KEYS, "burner"), kube=kube, redis=redis, quota_exists=lambda *_: True, now=START)


async def _set_usage(redis, now, tokens):
    day_key, month_key = contract.usage_keys(contract.key_subject("team", "burner"), now)
    await redis.hset(day_key, mapping={"settled": tokens, "requests": 1, "last": ms(now)})
    await redis.hset(month_key, mapping={"settled": tokens})


async def test_forecast_condition_and_event_in_the_write_back(kube, redis):
    await _key(kube, redis, {"tokensPerDay": 100_000})
    history = History()
    now = START + timedelta(hours=12)
    observed = []
    patches_with_forecast = 0
    for step in range(60):  # ten minutes at 6,000 tokens/minute: 100,000 runs out in ~16 min
        await _set_usage(redis, now, step * 1000)
        kube.patches.clear()
        observed = []
        await usage_cycle(
            redis, kube, [ObjectView.of(kube.get(KEYS, "burner"))], [], now, history=history, observed=observed
        )
        patches_with_forecast += sum(1 for p in kube.patches if "forecast" in p[3])
        now += timedelta(seconds=10)
    status = kube.get(KEYS, "burner")["status"]
    assert abs(status["forecast"]["tokensPerHour"] - 360_000) <= 0.1 * 360_000
    assert status["forecast"]["basis"].startswith("last ")
    assert "exhaustsAt" in status["forecast"]
    risk = cond.find(status["conditions"], cond.BUDGET_AT_RISK)
    assert risk["status"] == "True" and risk["reason"] == "TokensPerDayAtRisk"
    assert "tokensPerDay (100000)" in risk["message"]
    at_risk_events = [e for e in kube.events if e[2] == cond.BUDGET_AT_RISK]
    assert len(at_risk_events) == 1  # once, when it turned True
    assert at_risk_events[0][:2] == ("burner", "Warning") and "tokensPerDay" in at_risk_events[0][3]
    assert patches_with_forecast <= 6  # a steady burn: the forecast is not rewritten every cycle
    ((namespace, name, kind, result),) = observed
    assert (namespace, name, kind) == ("team", "burner", "AtlasKey") and result.first is not None


async def test_quiet_key_gets_neither_forecast_nor_patches(kube, redis):
    await _key(kube, redis, {"tokensPerDay": 100_000})
    await _set_usage(redis, START, 500)
    history = History()
    now = START
    await usage_cycle(redis, kube, [ObjectView.of(kube.get(KEYS, "burner"))], [], now, history=history)
    kube.patches.clear()
    for _ in range(30):
        now += timedelta(seconds=10)
        await usage_cycle(redis, kube, [ObjectView.of(kube.get(KEYS, "burner"))], [], now, history=history)
    status = kube.get(KEYS, "burner")["status"]
    assert "forecast" not in status and cond.find(status["conditions"], cond.BUDGET_AT_RISK) is None
    assert kube.patches == []


def test_history_memory_stays_small_over_hours():
    history = History()
    t = START
    for step in range(6 * 360):  # six hours of steady traffic, one reading every 10 s
        history.observe("k:a/b", ms(t), "2026-11", step * 50)
        t += timedelta(seconds=10)
    samples = history.samples["k:a/b"]
    assert len(samples) <= 16
    assert (ms(t) - samples[0].at_ms) / 1000 <= fc.RETENTION + fc.COARSE + 20  # the long window's start
    rate = history.observe("k:a/b", ms(t), "2026-11", 6 * 360 * 50)
    assert abs(rate.tokens_per_hour - 50 * 360) <= 0.02 * 50 * 360
