"""Properties of the operator's arithmetic over extreme numbers (issue 27): forecasts, budgets,
calendar windows and status planning, fed 0, 1, the CRD's maxima, tiny and huge rates, month
and year boundaries, and whatever Redis or a status may hold. Each test states what must hold
for every input Hypothesis tries."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from fractions import Fraction

from hypothesis import example, given, settings
from hypothesis import strategies as st

from atlas_core import contract
from atlas_core.contract import INT64_MAX, HistorySample, Limits, Usage
from atlas_devstack.merge_patch import merge_patch
from atlas_operator import conditions as cond
from atlas_operator import forecast as fc
from atlas_operator import times
from atlas_operator.history import History
from atlas_operator.settings import KEYS, QUOTAS
from atlas_operator.usage import plan
from atlas_operator.views import ObjectView

UTC = timezone.utc
CRD_MAX = 10**15  # tokensPerDay/Month/Minute maxima
counters = st.integers(0, INT64_MAX)  # what a Redis counter can hold


def _boundaries() -> st.SearchStrategy[datetime]:
    """Instants within a few seconds of a UTC month start (so of day and year ends too)."""
    return st.builds(
        lambda year, month, micros: datetime(year, month, 1, tzinfo=UTC) + timedelta(microseconds=micros),
        st.integers(1971, 9998),
        st.integers(1, 12),
        st.integers(-5_000_000, 5_000_000),
    )


# the operator's clock: any instant it could read, boundaries included
nows = st.one_of(st.datetimes(datetime(1971, 1, 1), datetime(9998, 12, 1), timezones=st.just(UTC)), _boundaries())
rates = st.floats(min_value=5e-324, max_value=1.7e308, allow_nan=False, allow_infinity=False)  # tokens/s
budget_limits = st.one_of(st.none(), st.integers(1, CRD_MAX))


# --------------------------------------------------------------------------- calendar windows


@given(nows)
@example(datetime(2026, 12, 31, 23, 59, 59, 999999, tzinfo=UTC))
@example(datetime(2028, 2, 29, 12, tzinfo=UTC))
def test_each_budget_resets_at_the_next_utc_day_and_month(now):
    """The window holding ``now`` ends at the next UTC midnight (day) and the next 1st (month):
    after ``now``, at most a day or a month later, and its last instant is still that day/month."""
    day, month = fc.next_day(now), fc.next_month(now)
    assert now < day <= now + timedelta(days=1) and (day.hour, day.minute, day.microsecond) == (0, 0, 0)
    assert now < month <= now + timedelta(days=31) and (month.day, month.hour) == (1, 0)
    last = timedelta(microseconds=1)
    assert contract.day_of(day - last) == contract.day_of(now) != contract.day_of(day)
    assert contract.month_of(month - last) == contract.month_of(now) != contract.month_of(month)


# --------------------------------------------------------------------------- forecasts


@given(rate=rates, day=budget_limits, month=budget_limits, today=counters, this_month=counters, now=nows)
@example(
    rate=5 / 3600, day=None, month=10**9, today=5, this_month=5, now=datetime(2026, 11, 27, 12, tzinfo=UTC)
)  # the report: ~23,000 years left
@example(rate=5e-324, day=CRD_MAX, month=CRD_MAX, today=0, this_month=0, now=datetime(2026, 1, 1, tzinfo=UTC))
def test_a_budget_is_forecast_to_run_out_only_before_it_resets(rate, day, month, today, this_month, now):
    """Never raises; every exhaustion lies in [now, reset), soonest first; a spent budget runs
    out now; one whose time left is clearly past its reset never shows; the status it writes
    fits the CRD (tokensPerHour an int64, exhaustsAt a time)."""
    budgets = fc.token_budgets(Limits(tokens_per_day=day, tokens_per_month=month), today, this_month, now)
    result = fc.forecast(fc.BurnRate(rate, 60.0), budgets, now)
    at = [e.at for e in result.exhaustions]
    assert at == sorted(at) and all(now <= e.at < e.budget.resets_at for e in result.exhaustions)
    shown = {e.budget.name for e in result.exhaustions}
    for budget in budgets:
        left = budget.limit - budget.used
        until_reset = Fraction((budget.resets_at - now) // timedelta(microseconds=1), 10**6)
        if left <= 0:
            assert budget.name in shown
        elif Fraction(left) / Fraction(rate) > 2 * until_reset:
            assert budget.name not in shown
        elif Fraction(left) / Fraction(rate) < until_reset / 2:
            assert budget.name in shown
    status = result.to_status()
    assert 0 <= status["tokensPerHour"] <= INT64_MAX
    if "exhaustsAt" in status:
        assert now - timedelta(seconds=1) <= times.parse_rfc3339(status["exhaustsAt"]) <= now + timedelta(days=31)


readings = st.lists(st.tuples(st.integers(0, 10**7), st.sampled_from(["2026-11", "2026-12"]), counters), max_size=60)


@given(readings)
def test_a_history_of_any_readings_gives_a_finite_rate_and_a_total_that_never_falls(steps):
    """Whatever the counters do (jump, fall, restart with the month), the running total never
    goes down, the rate is None or positive and finite, and a subject keeps a bounded history."""
    history = History()
    at_ms = 1_790_000_000_000
    for gap_ms, month, settled in steps:
        at_ms += gap_ms
        rate = history.observe("k:a/b", at_ms, month, settled)
        samples = history.samples["k:a/b"]
        assert all(a.total <= b.total for a, b in zip(samples, samples[1:])) and samples[0].total >= 0
        assert len(samples) <= contract.HISTORY_MAX_SAMPLES
        if rate is not None:
            assert 0 < rate.tokens_per_second < float("inf") and rate.window_seconds >= fc.MIN_HISTORY
            assert 0 <= rate.tokens_per_hour <= INT64_MAX


# --------------------------------------------------------------------------- status planning


def limits_specs() -> st.SearchStrategy[dict]:
    """A ``limits`` block as the CRD admits it (absent fields: no limit of that kind)."""
    fields = {
        "requestsPerSecond": st.floats(min_value=1e-9, max_value=1e6),
        "tokensPerMinute": st.integers(1, CRD_MAX),
        "tokensPerDay": st.integers(1, CRD_MAX),
        "tokensPerMonth": st.integers(1, CRD_MAX),
        "maxConcurrent": st.integers(1, 100_000),
        "costPerDay": st.floats(min_value=1e-6, max_value=1e9),
        "costPerMonth": st.floats(min_value=1e-6, max_value=1e9),
    }
    return st.fixed_dictionaries({}, optional=fields)


usages = st.builds(
    lambda today, month, requests, last, cost_day, cost_month, now: Usage(
        today, month, requests, contract.day_of(now), contract.month_of(now), last, cost_day, cost_month
    ),
    counters,
    counters,
    counters,
    st.one_of(st.none(), st.integers(0, contract.MAX_UNIX_SECONDS * 1000)),
    st.one_of(st.none(), counters),
    st.one_of(st.none(), counters),
    st.just(datetime(2026, 11, 27, tzinfo=UTC)),
)

shown_conditions = st.lists(
    st.fixed_dictionaries(
        {
            "type": st.sampled_from([cond.READY, cond.QUOTA_EXHAUSTED, cond.BUDGET_AT_RISK, cond.USAGE_STALE]),
            "status": st.sampled_from(["True", "False", "Unknown"]),
            "reason": st.sampled_from([cond.WITHIN_BUDGET, cond.FORECAST_FAILED, "TokensPerDayAtRisk", "Other"]),
            "message": st.text(max_size=20),
            "lastTransitionTime": st.just("2026-11-01T00:00:00Z"),
        }
    ),
    max_size=4,
    unique_by=lambda c: c["type"],
)

shown_forecasts = st.one_of(
    st.none(),
    st.fixed_dictionaries(
        {"tokensPerHour": st.integers(0, INT64_MAX), "basis": st.just("last 5m")},
        optional={
            "exhaustsAt": st.one_of(
                st.just("2026-11-27t13:00:00z"),
                st.just("not a time"),
                st.datetimes(timezones=st.just(UTC)).map(times.rfc3339),
            )
        },
    ),
)


def statuses() -> st.SearchStrategy[dict]:
    return st.builds(
        lambda conditions, forecast, usage: {
            "observedGeneration": 1,
            "conditions": conditions,
            **({"forecast": forecast} if forecast else {}),
            **({"usage": usage} if usage else {}),
        },
        shown_conditions,
        shown_forecasts,
        st.one_of(st.none(), st.just({"tokensToday": 1, "day": "x"})),
    )


objects = st.tuples(limits_specs(), usages, statuses(), st.booleans())


@settings(max_examples=60)
@given(
    key_objects=st.lists(objects, min_size=1, max_size=4),
    quota_object=objects,
    history_age=st.one_of(st.none(), st.floats(60, 7200)),
    now=nows,
)
def test_status_planning_never_fails_and_converges(key_objects, quota_object, history_age, now):
    """For any figures and any status shown: no object fails, the usage written is the usage
    read (never negative), QuotaExhausted is True exactly when a budget is spent, and once the
    patches are applied the same figures plan nothing more (no patch per cycle for a still key)."""
    quota = ObjectView("team", "q", "1", 1, {"limits": quota_object[0]}, quota_object[2], False)
    keys = [
        ObjectView("team", f"k{i}", "1", 1, {"limits": spec, **({"quotaRef": "q"} if bound else {})}, status, False)
        for i, (spec, _, status, bound) in enumerate(key_objects)
    ]
    figures = {contract.quota_subject("team", "q"): quota_object[1]}
    figures |= {contract.key_subject("team", f"k{i}"): usage for i, (_, usage, _, _) in enumerate(key_objects)}
    history = None
    if history_age is not None:
        history = History()
        start = int((now.timestamp() - history_age) * 1000)
        for subject in figures:
            history.samples[subject] = [HistorySample(start, contract.month_of(now), 0, 0)]
    failed = []
    todo = plan(keys, [quota], figures, now, history=history, failed=failed)
    assert failed == []
    views = {(QUOTAS, "q"): quota} | {(KEYS, k.name): k for k in keys}
    for plural, view, patch in todo:
        if "usage" in patch:
            written = merge_patch(view.status.get("usage"), patch["usage"])
            assert written["tokensToday"] == figures[_subject(plural, view)].tokens_today >= 0
        views[(plural, view.name)] = ObjectView(
            "team", view.name, "2", 1, view.spec, merge_patch(view.status, patch), False
        )
    quota_spent = _spent(quota, figures)
    for (plural, _), view in views.items():
        spent = _spent(view, figures) or (plural == KEYS and view.quota == "q" and quota_spent)
        shown = cond.find(view.status["conditions"], cond.QUOTA_EXHAUSTED)
        assert shown["status"] == ("True" if spent else "False")
    again = plan([views[(KEYS, k.name)] for k in keys], [views[(QUOTAS, "q")]], figures, now)
    assert again == []


def _subject(plural: str, view: ObjectView) -> str:
    return (contract.quota_subject if plural == QUOTAS else contract.key_subject)("team", view.name)


def _spent(view: ObjectView, figures: dict[str, Usage]) -> bool:
    limits = Limits.from_spec(view.spec["limits"])
    usage = figures[_subject(QUOTAS if view.name == "q" else KEYS, view)]
    return any(
        [
            limits.tokens_per_day is not None and usage.tokens_today >= limits.tokens_per_day,
            limits.tokens_per_month is not None and usage.tokens_this_month >= limits.tokens_per_month,
            limits.cost_per_day is not None and (usage.cost_today or 0) >= contract.to_micro(limits.cost_per_day),
            limits.cost_per_month is not None
            and (usage.cost_this_month or 0) >= contract.to_micro(limits.cost_per_month),
        ]
    )


# --------------------------------------------------------------------------- instants


@given(
    st.datetimes(datetime(1, 1, 1), datetime(9999, 12, 31, 23, 59, 59)),
    st.integers(-23 * 60 - 59, 23 * 60 + 59),
    st.booleans(),
    st.integers(0, 999_999_999),
)
@example(datetime(1, 1, 1), 60, False, 0)  # 0001-01-01T00:00:00+01:00: before year 1 in UTC
@example(datetime(9999, 12, 31, 23, 59, 59), -60, True, 0)
@example(datetime(2000, 1, 1, 0, 0, 0, 999_999), 0, False, 6_378_949)  # found once: local's µs were not in the text
def test_any_rfc3339_time_the_api_server_admits_parses_inside_the_range(local, offset_minutes, lower, nanos):
    """Lowercase separators, nanoseconds, any offset, years 1 and 9999: never an exception;
    the instant itself when it lies inside the range, else the range's nearest end."""
    local = local.replace(microsecond=0)  # the text carries the fraction as `nanos` alone
    sign = "-" if offset_minutes < 0 else "+"
    text = (
        f"{local.year:04d}-{local:%m-%dT%H:%M:%S}.{nanos:09d}{sign}{abs(offset_minutes) // 60:02d}:"
        f"{abs(offset_minutes) % 60:02d}"
    )
    parsed = times.parse_rfc3339(text.lower() if lower else text)
    assert times.EARLIEST <= parsed <= times.LATEST
    true_seconds = (local - datetime(1970, 1, 1)).total_seconds() - offset_minutes * 60 + nanos / 1e9
    expected = min(max(true_seconds, times.EARLIEST.timestamp()), times.LATEST.timestamp())
    assert abs(parsed.timestamp() - expected) < 1


@given(st.floats(allow_nan=True, allow_infinity=True))
@example(-62135596800.0)  # 0001-01-01T00:00:00Z
def test_any_unix_time_becomes_an_instant_a_status_can_show(seconds):
    """Inside the range, and written as an RFC 3339 time that reads back as itself."""
    instant = times.from_unix(seconds)
    assert times.EARLIEST <= instant <= times.LATEST
    assert times.parse_rfc3339(times.rfc3339(instant)) == instant.replace(microsecond=0)
