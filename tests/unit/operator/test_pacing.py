"""The write-back's pacing (pacing.py): the rate bound, which statuses go first, what is skipped."""

from __future__ import annotations

from datetime import datetime, timezone

from atlas_core import contract
from atlas_operator.keys import reconcile_key
from atlas_operator.pacing import StalenessQueue, TokenBucket
from atlas_operator.quotas import reconcile_quota
from atlas_operator.settings import KEYS, QUOTAS, OperatorSettings
from atlas_operator.usage import usage_cycle
from atlas_operator.views import ObjectView

from .fakes import FakeClock

NOW = datetime(2026, 11, 27, 12, 0, tzinfo=timezone.utc)


def item(plural, name, tokens_before=0, tokens_after=1, conditions=False, rv="1"):
    view = ObjectView(
        "team", name, rv, 1, {}, {"usage": {"tokensToday": tokens_before}, "observedGeneration": 1}, False
    )
    patch = {"usage": {"tokensToday": tokens_after}}
    if conditions:
        patch["conditions"] = []
    return plural, view, patch


def names(items):
    return [view.name for _, view, _ in items]


# ---------------------------------------------------------------- the token bucket


async def test_bucket_spends_its_burst_then_holds_the_rate():
    clock = FakeClock()
    bucket = TokenBucket(qps=10, burst=5, clock=clock, sleep=clock.sleep)
    start = clock()
    taken_at = []
    for _ in range(25):
        assert await bucket.take()
        taken_at.append(clock() - start)
    assert taken_at[:5] == [0.0] * 5  # the burst goes at once
    # then one token every 1/qps: 20 more tokens took 2 s
    assert abs(taken_at[-1] - 2.0) < 1e-9
    # the bound over any window T: at most burst + qps * T tokens
    for i, t0 in enumerate(taken_at):
        for j in range(i, len(taken_at)):
            assert j - i + 1 <= 5 + 10 * (taken_at[j] - t0) + 1e-9


async def test_bucket_refuses_a_token_it_cannot_give_before_the_deadline():
    clock = FakeClock()
    bucket = TokenBucket(qps=2, burst=1, clock=clock, sleep=clock.sleep)
    assert await bucket.take(deadline=clock())
    assert not await bucket.take(deadline=clock() + 0.4)  # the next one comes in 0.5 s
    assert clock.slept == []  # gave up without waiting
    assert await bucket.take(deadline=clock() + 0.5)
    assert clock.slept == [0.5]


async def test_bucket_saves_at_most_its_burst_while_idle():
    clock = FakeClock()
    bucket = TokenBucket(qps=100, burst=3, clock=clock, sleep=clock.sleep)
    clock.now += 3600
    results = [await bucket.take(deadline=clock()) for _ in range(5)]
    assert results == [True, True, True, False, False]


# ---------------------------------------------------------------- the order


def test_condition_flips_first_then_the_stalest_then_quotas_then_the_biggest_change():
    clock = FakeClock()
    queue = StalenessQueue(clock=clock)
    order, _ = queue.order([item(KEYS, "old-small", 0, 1)])
    assert names(order) == ["old-small"]  # not written: still behind next cycle
    clock.now += 10
    order, waiting = queue.order(
        [
            item(KEYS, "old-small", 0, 2),
            item(KEYS, "new-big", 0, 10_000),
            item(KEYS, "new-small", 0, 5),
            item(QUOTAS, "new-quota", 0, 1),
            item(KEYS, "new-flip", 0, 1, conditions=True),
        ]
    )
    assert names(order) == ["new-flip", "old-small", "new-quota", "new-big", "new-small"]
    assert waiting == 0
    assert queue.staleness() == 10.0  # old-small has been behind since the first cycle


def test_objects_in_sync_are_forgotten():
    clock = FakeClock()
    queue = StalenessQueue(clock=clock)
    queue.order([item(KEYS, "a"), item(KEYS, "b")])
    clock.now += 10
    queue.order([item(KEYS, "b")])  # a caught up (e.g. its reconcile wrote it)
    clock.now += 10
    order, _ = queue.order([item(KEYS, "b"), item(KEYS, "a", 0, 1_000)])
    assert names(order) == ["b", "a"]  # a's lag starts again now; b's is 20 s old
    assert set(queue.since) == {(KEYS, "team", "a"), (KEYS, "team", "b")}


def test_a_patch_not_yet_echoed_by_the_watch_is_not_sent_again():
    clock = FakeClock()
    queue = StalenessQueue(clock=clock)
    written = item(KEYS, "a", rv="7")
    queue.written(written, read_at=clock())
    # the watch still shows resourceVersion 7 (without our patch): sending again would conflict
    order, waiting = queue.order([item(KEYS, "a", rv="7"), item(KEYS, "b")])
    assert names(order) == ["b"] and waiting == 1
    order, waiting = queue.order([item(KEYS, "a", 1, 2, rv="8")])  # echoed, and changed again since
    assert names(order) == ["a"] and waiting == 0


def test_a_patch_never_echoed_is_sent_again_after_a_few_cycles():
    queue = StalenessQueue(clock=FakeClock())
    queue.written(item(KEYS, "a", rv="7"), read_at=0.0)
    waits = [queue.order([item(KEYS, "a", rv="7")])[1] for _ in range(StalenessQueue.ECHO_CYCLES + 1)]
    assert waits == [1] * StalenessQueue.ECHO_CYCLES + [0]


# ---------------------------------------------------------------- through the write-back


async def _fleet(kube, redis, n):
    kube.add(QUOTAS, "q", {})
    await reconcile_quota(kube.get(QUOTAS, "q"), kube=kube, redis=redis, key_count=n, now=NOW)
    for i in range(n):
        kube.add(KEYS, f"k{i}", {"quotaRef": "q"})
        await reconcile_key(kube.get(KEYS, f"k{i}"), kube=kube, redis=redis, quota_exists=lambda *_: True, now=NOW)


async def _traffic(redis, n, tokens):
    tag = contract.quota_subject("team", "q")
    for i in range(n):
        day, month = contract.usage_keys(contract.key_subject("team", f"k{i}"), NOW, tag)
        await redis.hincrby(day, "settled", tokens[i])
        await redis.hincrby(month, "settled", tokens[i])


def _views(kube, n):
    return [ObjectView.of(kube.get(KEYS, f"k{i}")) for i in range(n)], []


async def test_a_busy_fleet_is_written_round_robin_within_the_rate(kube, redis):
    """Every key changes every cycle, some by far more than others; two writes per cycle. The
    quiet keys are not starved by the busy ones: each key is written at least every
    ceil(n / rate) cycles, and no cycle writes more than its tokens."""
    n, per_cycle = 6, 2
    await _fleet(kube, redis, n)
    clock = FakeClock()
    bucket = TokenBucket(qps=per_cycle, burst=per_cycle, clock=clock, sleep=clock.sleep)
    queue = StalenessQueue(clock=clock)
    last_written = {f"k{i}": 0 for i in range(n)}
    for cycle in range(1, 13):
        kube.patches.clear()
        await _traffic(redis, n, [1000 if i < 2 else 1 for i in range(n)])  # k0, k1 burn the most
        deadline = clock() + 1.0
        stats = await usage_cycle(redis, kube, *_views(kube, n), NOW, bucket=bucket, queue=queue, deadline=deadline)
        assert stats.patches <= per_cycle * 2  # the saved burst plus one second's tokens
        for _, _, name, _ in kube.patches:
            last_written[name] = cycle
        clock.now = deadline
        if cycle >= n:
            assert all(cycle - last <= n // per_cycle + 1 for last in last_written.values()), last_written
    assert all(last > 0 for last in last_written.values())


async def test_unchanged_statuses_cost_no_token(kube, redis):
    n = 5
    await _fleet(kube, redis, n)
    clock = FakeClock()
    bucket = TokenBucket(qps=1, burst=n, clock=clock, sleep=clock.sleep)
    queue = StalenessQueue(clock=clock)
    await _traffic(redis, n, [3] * n)
    first = await usage_cycle(redis, kube, *_views(kube, n), NOW, bucket=bucket, queue=queue, deadline=clock())
    assert (first.patches, first.deferred) == (n, 0)
    kube.patches.clear()
    idle = await usage_cycle(redis, kube, *_views(kube, n), NOW, bucket=bucket, queue=queue, deadline=clock())
    assert (idle.patches, idle.deferred, kube.patches) == (0, 0, [])
    assert queue.since == {} and queue.staleness() == 0.0


def test_settings_rate_defaults_and_the_former_per_cycle_cap():
    default = OperatorSettings.from_env({})
    assert (default.status_writes_per_second, default.status_write_burst) == (250.0, 500)
    # the default writes 10,000 changed keys within a minute of the cycle that read them
    assert 10_000 / default.status_writes_per_second + default.usage_interval <= 60
    set_ = OperatorSettings.from_env({"ATLAS_STATUS_WRITES_PER_SECOND": "20", "ATLAS_STATUS_WRITE_BURST": "40"})
    assert (set_.status_writes_per_second, set_.status_write_burst) == (20.0, 40)
    legacy = OperatorSettings.from_env({"ATLAS_USAGE_MAX_WRITES": "500", "ATLAS_USAGE_INTERVAL_SECONDS": "5"})
    assert legacy.status_writes_per_second == 100.0


async def test_a_key_never_reconciled_is_left_to_its_reconcile(kube, redis):
    """The CRD defaults status.observedGeneration to 0 (for GitOps tools): such a key has had no
    reconcile yet, and a usage patch would only race it (and spend the write rate)."""
    await _fleet(kube, redis, 1)
    kube.add(KEYS, "new", {"quotaRef": "q"})
    kube.get(KEYS, "new")["status"] = {"observedGeneration": 0}
    day, month = contract.usage_keys(contract.key_subject("team", "new"), NOW, contract.quota_subject("team", "q"))
    await redis.hset(day, "settled", 5)
    kube.patches.clear()
    stats = await usage_cycle(redis, kube, [ObjectView.of(kube.get(KEYS, "new"))], [], NOW)
    assert (stats.patches, kube.patches) == (0, [])
