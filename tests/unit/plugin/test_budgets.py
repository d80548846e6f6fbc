"""`kubectl atlas usage` / `top` figures from objects as the API server returns them (pure)."""

from __future__ import annotations

from datetime import datetime, timezone
from decimal import Decimal

import pytest

from atlas_kubectl import budgets, cli

NOW = datetime(2026, 11, 27, 10, 0, 0, tzinfo=timezone.utc)


def obj(
    kind: str,
    name: str,
    limits: dict | None = None,
    usage: dict | None = None,
    forecast: dict | None = None,
    namespace: str = "team-a",
) -> dict:
    status = {"usage": {"day": "2026-11-27", "month": "2026-11", **(usage or {})}}
    if forecast:
        status["forecast"] = forecast
    return {
        "kind": kind,
        "metadata": {"namespace": namespace, "name": name},
        "spec": {"limits": limits or {}},
        "status": status,
    }


def test_one_row_per_budget_with_used_limit_and_percent():
    rows = budgets.usage_rows(
        [
            obj(
                "AtlasKey",
                "k",
                {"tokensPerDay": 1000, "tokensPerMonth": 40000, "requestsPerSecond": 5},
                {"tokensToday": 250, "tokensThisMonth": 1000},
            )
        ],
        NOW,
    )
    assert [(r.budget, r.used, r.limit, r.percent) for r in rows] == [
        ("tokensPerDay", 250, 1000, 25.0),
        ("tokensPerMonth", 1000, 40000, 2.5),
    ]
    assert rows[0].kind == "key" and rows[0].namespace == "team-a"


def test_soft_budgets_are_rows_too_with_when_demotion_begins():
    rows = budgets.usage_rows(
        [
            obj(
                "AtlasQuota",
                "q",
                {"tokensPerDay": 1000, "softTokensPerDay": 800},
                {"tokensToday": 600},
                {"tokensPerHour": 100},
            )
        ],
        NOW,
    )
    assert [(r.budget, r.used, r.limit) for r in rows] == [("tokensPerDay", 600, 1000), ("softTokensPerDay", 600, 800)]
    assert rows[1].exhausts_at == datetime(2026, 11, 27, 12, 0, tzinfo=timezone.utc)  # 200 left at 100/h


def test_an_object_without_a_day_or_month_budget_still_shows_what_it_used():
    (row,) = budgets.usage_rows([obj("AtlasKey", "open", {"requestsPerSecond": 5}, {"tokensToday": 77})], NOW)
    assert (row.budget, row.used, row.limit, row.percent) == (None, 77, None, None)


def test_cost_budgets_are_exact_decimals_and_have_no_token_forecast():
    (row,) = budgets.usage_rows(
        [obj("AtlasQuota", "q", {"costPerDay": 2.5}, {"costToday": "0.000123"}, {"tokensPerHour": 10_000})], NOW
    )
    assert row.used == Decimal("0.000123") and row.limit == Decimal("2.5")
    assert row.tokens_per_hour is None and row.exhausts_at is None
    assert row.as_dict()["used"] == "0.000123"


def test_the_forecast_names_the_time_a_budget_runs_out_before_it_resets():
    # 600 tokens left at 1200/hour: 30 minutes from now, long before midnight
    (row,) = budgets.usage_rows(
        [obj("AtlasKey", "k", {"tokensPerDay": 1000}, {"tokensToday": 400}, {"tokensPerHour": 1200})], NOW
    )
    assert row.exhausts_at == datetime(2026, 11, 27, 10, 30, tzinfo=timezone.utc)
    assert row.as_dict()["exhaustsAt"] == "2026-11-27T10:30:00Z"


def test_no_forecast_when_the_budget_outlasts_its_reset():
    # 600 tokens at 10/hour would take 60 h: the day resets first
    (row,) = budgets.usage_rows(
        [obj("AtlasKey", "k", {"tokensPerDay": 1000}, {"tokensToday": 400}, {"tokensPerHour": 10})], NOW
    )
    assert row.exhausts_at is None


@pytest.mark.parametrize("left,rate", [(10**15, 1e-9), (1, 1e300), (10**15, 10**15)])
def test_extreme_budgets_and_rates_never_overflow_a_date(left, rate):
    budgets.runs_out_at(Decimal(left), rate, budgets.reset_of(budgets.MONTH, NOW), NOW)


def test_a_spent_budget_reads_spent():
    (row,) = budgets.usage_rows([obj("AtlasKey", "k", {"tokensPerDay": 100}, {"tokensToday": 100})], NOW)
    assert row.exhausts_at == NOW and cli._exhausts(row) == "spent"


def test_figures_of_a_past_day_are_not_todays():
    stale = obj(
        "AtlasKey",
        "k",
        {"tokensPerDay": 100, "tokensPerMonth": 1000},
        {"day": "2026-11-26", "tokensToday": 90, "tokensThisMonth": 500},
    )
    day, month = budgets.usage_rows([stale], NOW)
    assert day.used == 0 and month.used == 500


def test_resets_roll_over_months_and_years():
    dec = datetime(2026, 12, 31, 23, 0, tzinfo=timezone.utc)
    assert budgets.reset_of(budgets.MONTH, dec) == datetime(2027, 1, 1, tzinfo=timezone.utc)
    assert budgets.reset_of(budgets.DAY, dec) == datetime(2027, 1, 1, tzinfo=timezone.utc)
    assert budgets.reset_of(budgets.MONTH, NOW) == datetime(2026, 12, 1, tzinfo=timezone.utc)


def test_sorting_by_percent_puts_the_fullest_first_and_budgetless_rows_last():
    objects = [
        obj("AtlasKey", "a", {"tokensPerDay": 100}, {"tokensToday": 10}),
        obj("AtlasKey", "b", {"tokensPerDay": 100}, {"tokensToday": 90}),
        obj("AtlasKey", "c", {}, {"tokensToday": 5000}),
        obj("AtlasQuota", "q", {"tokensPerDay": 1000}, {"tokensToday": 500}),
    ]
    rows = cli.sort(budgets.usage_rows(objects, NOW), cli.USAGE_SORTS, "percent")
    assert [r.name for r in rows] == ["b", "q", "a", "c"]
    rows = cli.sort(budgets.usage_rows(objects, NOW), cli.USAGE_SORTS, "used")
    assert [r.name for r in rows] == ["c", "q", "b", "a"]


def test_top_orders_by_burn_rate_and_keeps_idle_objects_last():
    objects = [
        obj("AtlasKey", "idle", usage={"tokensToday": 3}),
        obj(
            "AtlasKey",
            "busy",
            usage={"tokensToday": 10, "requestsToday": 2},
            forecast={"tokensPerHour": 9000, "basis": "last 5m"},
        ),
        obj("AtlasQuota", "q", forecast={"tokensPerHour": 100, "basis": "last 1h"}),
    ]
    rows = cli.sort(budgets.burn_rows(objects, NOW), cli.TOP_SORTS, "rate")
    assert [(b.name, b.tokens_per_hour, b.basis) for b in rows] == [
        ("busy", 9000, "last 5m"),
        ("q", 100, "last 1h"),
        ("idle", None, None),
    ]
    assert rows[0].requests_today == 2
