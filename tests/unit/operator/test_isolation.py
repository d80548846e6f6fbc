"""One object's failure is its own (issue 27): the forecast that ran past year 9999, and every
loop and handler of the operator going on for the other objects while the failing one shows a
condition or an Event, is counted in /metrics and is logged once."""

from __future__ import annotations

import logging
from datetime import datetime, timedelta, timezone

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from redis.exceptions import ConnectionError as RedisConnectionError

from atlas_core import contract
from atlas_core.contract import KeyConfig, Limits
from atlas_operator import conditions as cond
from atlas_operator import failures, main, times, usage
from atlas_operator import forecast as fc
from atlas_operator.carry_over import CarryOver
from atlas_operator.failures import Failures, ObjectFailed
from atlas_operator.heal import heal_if_needed
from atlas_operator.history import History
from atlas_operator.keys import desired_key_config, parse_time, reconcile_key
from atlas_operator.metrics import OperatorCollector
from atlas_operator.settings import KEYS, QUOTAS
from atlas_operator.usage import plan, usage_cycle
from atlas_operator.views import ObjectView, SecretView

from .test_runtime import index_key, index_quota, make_runtime

NOW = datetime(2026, 11, 27, 12, 0, tzinfo=timezone.utc)


# --------------------------------------------------------------------------- the report


def test_the_reported_forecast_no_longer_overflows():
    """Limits(tokens_per_month=10^9), 5 tokens used at 5 tokens/hour: ~23,000 years left."""
    rate = fc.BurnRate(5 / 3600, 3600)
    result = fc.forecast(rate, fc.token_budgets(Limits(tokens_per_month=1_000_000_000), 5, 5, NOW), NOW)
    assert result is not None and result.exhaustions == ()  # runs out long after the month resets
    assert result.to_status() == {"tokensPerHour": 5, "basis": "last 1h"}


async def test_huge_budget_with_a_trickle_beside_ordinary_keys(kube, redis):
    """The report through the write-back: every key's usage is written, the big one's too."""
    for name, limits in (("big", {"tokensPerMonth": 10**9}), ("a", {"tokensPerDay": 1000}), ("b", {})):
        kube.add(KEYS, name, {"limits": limits})
        await reconcile_key(kube.get(KEYS, name), kube=kube, redis=redis, quota_exists=lambda *_: True, now=NOW)
    history = History()
    big = contract.key_subject("team", "big")
    history.samples[big] = [contract.HistorySample(_ms(NOW - timedelta(hours=1)), "2026-11", 0, 0)]
    for name, tokens in (("big", 5), ("a", 40), ("b", 70)):
        day, month = contract.usage_keys(contract.key_subject("team", name), NOW)
        await redis.hset(day, mapping={"settled": tokens, "requests": 1})
        await redis.hset(month, mapping={"settled": tokens})
    stats = await usage_cycle(redis, kube, [_view(kube, KEYS, n) for n in ("big", "a", "b")], [], NOW, history=history)
    assert stats.failed == 0 and stats.patches == 3
    assert {n: kube.get(KEYS, n)["status"]["usage"]["tokensThisMonth"] for n in ("big", "a", "b")} == {
        "big": 5,
        "a": 40,
        "b": 70,
    }
    assert kube.get(KEYS, "big")["status"]["forecast"] == {"tokensPerHour": 5, "basis": "last 1h"}


# --------------------------------------------------------------------------- the write-back


def _ms(at: datetime) -> int:
    return int(at.timestamp() * 1000)


def _view(kube, plural, name) -> ObjectView:
    return ObjectView.of(kube.get(plural, name))


async def _keys(kube, redis, *names, spec=None):
    for name in names:
        kube.add(KEYS, name, spec or {"limits": {"tokensPerDay": 1000}})
        await reconcile_key(kube.get(KEYS, name), kube=kube, redis=redis, quota_exists=lambda *_: True, now=NOW)


async def _use(redis, name, tokens):
    day, month = contract.usage_keys(contract.key_subject("team", name), NOW)
    await redis.hset(day, mapping={"settled": tokens, "requests": 1})
    await redis.hset(month, mapping={"settled": tokens})


def test_a_failing_forecast_withdraws_only_that_forecast(monkeypatch):
    real = fc.forecast

    def forecast(rate, budgets, now):
        budgets = list(budgets)
        if budgets and budgets[0].limit == 666:
            raise ArithmeticError("a bug in the forecast")
        return real(rate, budgets, now)

    monkeypatch.setattr(fc, "forecast", forecast)
    within = [
        {
            "type": cond.BUDGET_AT_RISK,
            "status": "False",
            "reason": cond.WITHIN_BUDGET,
            "message": "m",
            "lastTransitionTime": "2026-11-27T00:00:00Z",
        }
    ]
    views = [
        ObjectView(
            "team",
            n,
            "1",
            1,
            {"limits": {"tokensPerDay": limit}},
            {"observedGeneration": 1, "forecast": {"tokensPerHour": 9, "basis": "last 5m"}, "conditions": within},
            False,
        )
        for n, limit in (("broken", 666), ("fine", 10**6))
    ]
    history = History()
    usages = {}
    for view in views:
        subject = contract.key_subject("team", view.name)
        history.samples[subject] = [contract.HistorySample(_ms(NOW - timedelta(minutes=10)), "2026-11", 0, 0)]
        usages[subject] = contract.Usage(tokens_today=600, tokens_this_month=600, day="2026-11-27", month="2026-11")
    failed = []
    todo = {view.name: patch for _, view, patch in plan(views, [], usages, NOW, history=history, failed=failed)}
    assert [(loop, view.name) for loop, _, view, _ in failed] == [(failures.FORECAST, "broken")]
    assert todo["broken"]["usage"]["tokensToday"] == 600  # the usage is written all the same
    assert todo["broken"]["forecast"] is None  # the stale forecast goes
    risk = cond.find(todo["broken"]["conditions"], cond.BUDGET_AT_RISK)
    assert (risk["status"], risk["reason"]) == ("Unknown", cond.FORECAST_FAILED)
    assert "ArithmeticError: a bug in the forecast" in risk["message"]
    assert todo["fine"]["forecast"]["tokensPerHour"] == 3600 and "UsageStale" not in str(todo["fine"])


def test_an_object_that_cannot_be_planned_gets_usage_stale_and_the_others_go_on():
    views = [
        ObjectView("team", n, "1", 1, {"limits": {"tokensPerDay": limit}}, {"observedGeneration": 1}, False)
        for n, limit in (("a", 100), ("odd", "many"), ("z", 100))
    ]  # int("many") raises
    usages = {
        contract.key_subject("team", n): contract.Usage(tokens_today=7, day="d", month="m") for n in ("a", "odd", "z")
    }
    failed = []
    todo = {view.name: patch for _, view, patch in plan(views, [], usages, NOW, failed=failed)}
    assert todo["a"]["usage"]["tokensToday"] == 7 and todo["z"]["usage"]["tokensToday"] == 7
    assert list(todo["odd"]) == ["conditions"]
    stale = cond.find(todo["odd"]["conditions"], cond.USAGE_STALE)
    assert (stale["status"], stale["reason"]) == ("True", cond.WRITE_BACK_FAILED)
    assert "ValueError" in stale["message"] and [v.name for _, _, v, _ in failed] == ["odd"]


async def test_unreadable_counters_show_once_and_clear_when_repaired(kube, redis, caplog):
    await _keys(kube, redis, "a", "damaged", "z")
    for name in ("a", "z"):
        await _use(redis, name, 10)
    day, _ = contract.usage_keys(contract.key_subject("team", "damaged"), NOW)
    await redis.hset(day, "settled", "NaN")
    tracker = Failures()
    views = lambda: [_view(kube, KEYS, n) for n in ("a", "damaged", "z")]
    with caplog.at_level(logging.INFO, logger="atlas_operator"):
        first = await usage_cycle(redis, kube, views(), [], NOW, tracker=tracker)
        kube.patches.clear()
        second = await usage_cycle(redis, kube, views(), [], NOW, tracker=tracker)
    assert first.failed == second.failed == 1 and first.patches == 3 and kube.patches == []  # shown: no rewrite
    status = kube.get(KEYS, "damaged")["status"]
    stale = cond.find(status["conditions"], cond.USAGE_STALE)
    assert (stale["status"], stale["reason"]) == ("True", cond.USAGE_UNREADABLE) and "NaN" in stale["message"]
    assert [kube.get(KEYS, n)["status"]["usage"]["tokensToday"] for n in ("a", "z")] == [10, 10]
    assert [e[2] for e in kube.events if e[0] == "damaged" and e[1] == "Warning"] == ["UsageWriteBackFailed"]
    obj = ("AtlasKey", "team", "damaged")
    assert tracker.counts[(failures.USAGE, *obj)] == 2
    assert sum("team/damaged: usage write-back failed" in r.getMessage() for r in caplog.records) == 1

    await redis.hset(day, "settled", 3)
    with caplog.at_level(logging.INFO, logger="atlas_operator"):
        await usage_cycle(redis, kube, views(), [], NOW, tracker=tracker)
    status = kube.get(KEYS, "damaged")["status"]
    assert cond.find(status["conditions"], cond.USAGE_STALE) is None and status["usage"]["tokensToday"] == 3
    assert (failures.USAGE, *obj) not in tracker.failing
    assert any("team/damaged: usage write-back works again" in r.getMessage() for r in caplog.records)


async def test_events_of_many_new_failures_are_spread_over_cycles(kube, redis):
    """A bug failing every object must not post thousands of Events in one cycle."""
    views = [
        ObjectView("team", f"k{i}", "1", 1, {"limits": {"tokensPerDay": "lots"}}, {"observedGeneration": 1}, False)
        for i in range(60)
    ]
    for view in views:
        await _use(redis, view.name, 1)
    tracker = Failures()
    await usage_cycle(redis, kube, views, [], NOW, tracker=tracker)
    assert len(kube.events) == usage.EVENTS_PER_CYCLE == 50
    await usage_cycle(redis, kube, views, [], NOW, tracker=tracker)
    assert sorted(e[0] for e in kube.events) == sorted(v.name for v in views)  # the rest, then none again
    await usage_cycle(redis, kube, views, [], NOW, tracker=tracker)
    assert len(kube.events) == 60 and len(tracker.failing) == 60


async def test_a_refused_status_patch_is_that_objects_own(kube, redis):
    await _keys(kube, redis, "a", "refused", "z")
    for name in ("a", "refused", "z"):
        await _use(redis, name, 10)
    kube.invalid_fields["refused"] = {"usage"}  # the API server refuses its figures, not a condition
    tracker = Failures()
    stats = await usage_cycle(
        redis, kube, [_view(kube, KEYS, n) for n in ("a", "refused", "z")], [], NOW, tracker=tracker
    )
    assert (stats.patches, stats.failed) == (2, 1)
    stale = cond.find(kube.get(KEYS, "refused")["status"]["conditions"], cond.USAGE_STALE)
    assert stale["reason"] == cond.STATUS_REFUSED and "422 Unprocessable Entity: status.usage" in stale["message"]
    assert [e[2] for e in kube.events if e[0] == "refused"][-1] == "UsageWriteBackFailed"

    kube.refuse["a"] = ConnectionResetError("the API server went away")  # not even a condition gets through
    await _use(redis, "a", 20)
    kube.patches.clear()
    stats = await usage_cycle(
        redis, kube, [_view(kube, KEYS, n) for n in ("a", "refused", "z")], [], NOW, tracker=tracker
    )
    assert stats.failed == 2 and ("usage write-back", "AtlasKey", "team", "a") in tracker.failing
    assert kube.patches == []  # "refused" already shows why: its refused patch is all it costs


async def test_damaged_v1_counters_fail_only_their_carry_over(kube, redis):
    await _keys(kube, redis, "a", "damaged")
    await redis.set(contract.V1_CONFIG_EPOCH, "1")
    for name, settled in (("a", "25"), ("damaged", "lots")):
        day, month = contract.v1_usage_keys(contract.key_subject("team", name), NOW)
        await redis.hset(day, mapping={"settled": settled, "requests": 1})
        await redis.hset(month, mapping={"settled": settled})
    carry_over = CarryOver()
    stats = await usage_cycle(
        redis, kube, [_view(kube, KEYS, n) for n in ("a", "damaged")], [], NOW, carry_over=carry_over
    )
    assert stats.failed == 1
    assert kube.get(KEYS, "a")["status"]["usage"]["tokensToday"] == 25
    stale = cond.find(kube.get(KEYS, "damaged")["status"]["conditions"], cond.USAGE_STALE)
    assert stale["reason"] == cond.USAGE_UNREADABLE and "v1 contract" in stale["message"]


# --------------------------------------------------------------------------- self-healing


async def test_self_healing_restores_every_config_but_the_failing_ones(redis):
    keys = [
        ObjectView("team", n, "1", 1, spec, {}, False)
        for n, spec in (("a", {}), ("broken", {"limits": {"tokensPerDay": "lots"}}), ("z", {}))
    ]
    secrets = {
        ("team", f"{n}-api-key"): SecretView("1", contract.hash_api_key(f"sk-{n}-0123456789"))
        for n in ("a", "broken", "z")
    }
    healed = await heal_if_needed(
        redis, keys, [ObjectView("team", "q", "1", 1, {"limits": "x"}, {}, False)], secrets, NOW
    )
    assert healed.rewritten == 2
    assert sorted((plural, view.name) for plural, view, _ in healed.failed) == [(KEYS, "broken"), (QUOTAS, "q")]
    for name in ("a", "z"):
        raw = await redis.get(contract.key_config_key(contract.hash_api_key(f"sk-{name}-0123456789")))
        assert KeyConfig.decode(raw).name == name
    assert await redis.get(contract.key_config_key(contract.hash_api_key("sk-broken-0123456789"))) is None


# --------------------------------------------------------------------------- handlers


async def test_a_failing_reconcile_is_reported_once_and_raised_for_kopf(kube, redis, caplog):
    rt = make_runtime(kube, redis)
    kube.add(KEYS, "k", {})
    kube.refuse["k-api-key"] = ValueError("the Secret reads back wrong")
    with caplog.at_level(logging.WARNING, logger="atlas_operator"):
        for _ in range(3):
            with pytest.raises(ObjectFailed) as failure:
                await rt.reconcile_key(kube.get(KEYS, "k"))
    assert "ValueError: the Secret reads back wrong" in str(failure.value)
    retry = main.for_kopf(failure.value)  # kopf retries it, later each time
    assert isinstance(retry, main.kopf.TemporaryError) and retry.delay == failure.value.retry_in == 8.0
    assert [e[2] for e in kube.events] == ["ReconcileFailed"]  # once, not per retry
    assert sum("AtlasKey team/k: reconcile failed" in r.getMessage() for r in caplog.records) == 1
    assert rt.failures.counts[(failures.RECONCILE, "AtlasKey", "team", "k")] == 3

    del kube.refuse["k-api-key"]
    assert (await rt.reconcile_key(kube.get(KEYS, "k"))).ready
    assert not rt.failures.failing


async def test_a_failure_by_name_is_retried_by_the_timer_with_backoff(kube, redis):
    rt = make_runtime(kube, redis)
    kube.add(KEYS, "k", {})
    kube.refuse["k-api-key"] = RedisConnectionError("Redis went away")
    await rt.reconcile_key_by_name("team", "k")  # never raises: the key's problem, reported
    assert rt.scheduler.next_at() is not None  # a retry is due
    due = rt.scheduler.next_at() - datetime.now(timezone.utc).timestamp()
    assert 0 < due <= 2.5
    await rt.reconcile_key_by_name("team", "k")
    assert rt.failures.retry_in(failures.RECONCILE, ("AtlasKey", "team", "k")) == 4.0  # backing off


async def test_one_keys_failure_does_not_fail_its_quotas_handler(kube, redis):
    rt = make_runtime(kube, redis)
    kube.add(QUOTAS, "q", {"limits": {"tokensPerDay": 10}})
    index_quota(rt, kube, "q")
    for name in ("a", "broken"):
        kube.add(KEYS, name, {"quotaRef": "q"})
        index_key(rt, kube, name)
    kube.refuse["broken-api-key"] = KeyError("data")
    await rt.reconcile_quota(kube.get(QUOTAS, "q"))
    await rt.reconcile_dependents("team", "q")  # as on the quota's creation
    assert cond.find(kube.get(KEYS, "a")["status"]["conditions"], cond.READY)["status"] == "True"
    assert ("reconcile", "AtlasKey", "team", "broken") in rt.failures.failing


async def test_failures_are_counted_in_the_operator_metrics(kube, redis):
    rt = make_runtime(kube, redis)
    rt.failures.failed(failures.USAGE, ("AtlasKey", "team", "k"), "its usage counters in Redis do not parse")
    rt.failures.failed(failures.USAGE, ("AtlasKey", "team", "k"), "its usage counters in Redis do not parse")
    rt.failures.loop_failed(failures.HEAL, RedisConnectionError("down"))
    registry = CollectorRegistry(auto_describe=False)
    registry.register(OperatorCollector(rt.failures))
    text = generate_latest(registry).decode()
    assert (
        'atlas_operator_object_failures_total{kind="AtlasKey",loop="usage write-back",name="k",namespace="team"} 2.0'
    ) in text
    assert 'atlas_operator_failing_objects{loop="usage write-back"} 1.0' in text
    assert 'atlas_operator_loop_failures_total{loop="self-healing"} 1.0' in text


async def test_a_whole_loop_failing_is_logged_once_until_it_recovers(kube, redis, caplog):
    rt = make_runtime(kube, redis)
    calls = []

    class Stop(BaseException):
        pass

    async def flaky():
        calls.append(1)
        if len(calls) <= 3:
            raise RedisConnectionError("Redis unreachable")
        if len(calls) == 5:
            raise Stop

    with caplog.at_level(logging.INFO, logger="atlas_operator"), pytest.raises(Stop):
        await rt._every(0, flaky, failures.USAGE)
    messages = [r.getMessage() for r in caplog.records]
    assert sum("usage write-back failed: ConnectionError: Redis unreachable" in m for m in messages) == 1
    assert messages.count("usage write-back works again") == 1
    assert rt.failures.loop_counts[failures.USAGE] == 3


# --------------------------------------------------------------------------- instants


@pytest.mark.parametrize(
    "text, expected",
    [
        ("2027-01-01t00:00:00z", datetime(2027, 1, 1, tzinfo=timezone.utc)),  # RFC 3339 allows lowercase
        ("2027-01-01T00:00:00.123456789Z", datetime(2027, 1, 1, 0, 0, 0, 123456, tzinfo=timezone.utc)),
        ("2027-01-01T01:00:00+01:00", datetime(2027, 1, 1, tzinfo=timezone.utc)),
        ("0001-01-01T00:00:00+01:00", times.EARLIEST),  # past year 1 in UTC: saturates
        ("9999-12-31T23:59:59-01:00", times.LATEST),
    ],
)
def test_expires_at_as_the_api_server_admits_it(text, expected):
    assert parse_time(text) == expected


def test_an_expiry_before_year_one_is_simply_expired():
    _, ready, reason, _ = desired_key_config(
        "team", "k", {"expiresAt": "0001-01-01T00:00:00+01:00"}, "ab" * 32, lambda *_: True, NOW
    )
    assert (ready, reason) == (False, cond.EXPIRED)


async def test_quota_reconcile_failure_is_its_own(kube, redis):
    rt = make_runtime(kube, redis)
    kube.add(QUOTAS, "q", {"limits": {"tokensPerDay": "lots"}})
    with pytest.raises(ObjectFailed):
        await rt.reconcile_quota(kube.get(QUOTAS, "q"))
    await rt.reconcile_quota_by_name("team", "q")  # a re-trigger never raises
    assert [e[2] for e in kube.events] == ["ReconcileFailed"]
