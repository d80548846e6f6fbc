"""AtlasQuota reconcile, usage write-back diffing and self-healing, called directly."""

from __future__ import annotations

from datetime import datetime, timezone

from atlas_core import contract
from atlas_core.contract import KeyConfig, QuotaConfig
from atlas_operator import conditions as cond
from atlas_operator import store
from atlas_operator.heal import heal_if_needed
from atlas_operator.keys import reconcile_key
from atlas_operator.pacing import StalenessQueue, TokenBucket
from atlas_operator.quotas import delete_quota, reconcile_quota
from atlas_operator.settings import KEYS, QUOTAS
from atlas_operator.usage import plan, usage_cycle
from atlas_operator.views import ObjectView, SecretView

from .fakes import FakeClock

NOW = datetime(2026, 11, 27, 12, 0, tzinfo=timezone.utc)


async def test_quota_config_status_and_delete(kube, redis):
    kube.add(QUOTAS, "team-search", {"limits": {"tokensPerDay": 100, "maxConcurrent": 3}})
    outcome = await reconcile_quota(kube.get(QUOTAS, "team-search"), kube=kube, redis=redis, key_count=2, now=NOW)
    assert outcome.redis_written and outcome.status_patched
    raw = await redis.get(contract.quota_config_key("team", "team-search"))
    assert QuotaConfig.decode(raw).limits.max_concurrent == 3
    assert await redis.sismember(contract.QUOTA_INDEX, "team/team-search")
    status = kube.get(QUOTAS, "team-search")["status"]
    assert status["keys"] == 2 and cond.find(status["conditions"], cond.READY)["status"] == "True"
    again = await reconcile_quota(kube.get(QUOTAS, "team-search"), kube=kube, redis=redis, key_count=2, now=NOW)
    assert not again.redis_written and not again.status_patched
    assert await delete_quota(kube.get(QUOTAS, "team-search"), redis=redis)
    assert await redis.get(contract.quota_config_key("team", "team-search")) is None


async def test_quota_pricing_from_a_missing_price_list_is_stalled_until_it_exists(kube, redis):
    kube.add(QUOTAS, "q", {"priceListRef": "prices"})
    await reconcile_quota(kube.get(QUOTAS, "q"), kube=kube, redis=redis, key_count=0, now=NOW)
    conditions = {c["type"]: c for c in kube.get(QUOTAS, "q")["status"]["conditions"]}
    assert (conditions[cond.READY]["status"], conditions[cond.STALLED]["status"]) == ("False", "True")
    assert conditions[cond.STALLED]["reason"] == cond.PRICE_LIST_NOT_FOUND
    spec = {"currency": "USD", "prices": [{"model": "*", "input": 1, "output": 1}]}
    await reconcile_quota(
        kube.get(QUOTAS, "q"), kube=kube, redis=redis, key_count=0, now=NOW, price_list=lambda ns, name: spec
    )
    conditions = {c["type"]: c for c in kube.get(QUOTAS, "q")["status"]["conditions"]}
    assert conditions[cond.READY]["status"] == "True" and cond.STALLED not in conditions


def view(kube, plural, name):
    return ObjectView.of(kube.get(plural, name))


async def settle(redis, subject, tokens, requests=1, last_ms=1_795_000_000_000):
    # every key here is bound to team-search: its counters carry the quota's slot tag
    day_key, month_key = contract.usage_keys(subject, NOW, contract.quota_subject("team", "team-search"))
    await redis.hset(day_key, mapping={"settled": tokens, "requests": requests, "last": last_ms})
    await redis.hset(month_key, mapping={"settled": tokens})


async def _setup(kube, redis):
    kube.add(QUOTAS, "team-search", {"limits": {"tokensPerDay": 1000}})
    await reconcile_quota(kube.get(QUOTAS, "team-search"), kube=kube, redis=redis, key_count=2, now=NOW)
    for name, limits in (("a", {"tokensPerDay": 100}), ("b", {})):
        kube.add(KEYS, name, {"quotaRef": "team-search", "limits": limits})
        await reconcile_key(kube.get(KEYS, name), kube=kube, redis=redis, quota_exists=lambda *_: True, now=NOW)


async def test_usage_cycle_patches_only_changes(kube, redis):
    await _setup(kube, redis)
    views = lambda: ([view(kube, KEYS, "a"), view(kube, KEYS, "b")], [view(kube, QUOTAS, "team-search")])
    kube.patches.clear()
    stats = await usage_cycle(redis, kube, *views(), NOW)
    assert stats.patches == 0 and stats.subjects == 3 and stats.redis_round_trips == 1

    await settle(redis, contract.key_subject("team", "a"), 40)
    await settle(redis, contract.quota_subject("team", "team-search"), 40)
    stats = await usage_cycle(redis, kube, *views(), NOW)
    assert stats.patches == 2 and {p[2] for p in kube.patches} == {"a", "team-search"}
    usage = kube.get(KEYS, "a")["status"]["usage"]
    assert usage["tokensToday"] == 40 and usage["requestsToday"] == 1 and usage["day"] == "2026-11-27"
    assert "lastRequestTime" in usage
    assert kube.get(QUOTAS, "team-search")["status"]["usage"]["tokensThisMonth"] == 40

    kube.patches.clear()
    assert (await usage_cycle(redis, kube, *views(), NOW)).patches == 0  # unchanged: no writes


async def test_quota_exhausted_on_key_and_shared(kube, redis):
    await _setup(kube, redis)
    await settle(redis, contract.key_subject("team", "a"), 100)
    await settle(redis, contract.quota_subject("team", "team-search"), 1000)
    await usage_cycle(
        redis, kube, [view(kube, KEYS, "a"), view(kube, KEYS, "b")], [view(kube, QUOTAS, "team-search")], NOW
    )
    a = cond.find(kube.get(KEYS, "a")["status"]["conditions"], cond.QUOTA_EXHAUSTED)
    b = cond.find(kube.get(KEYS, "b")["status"]["conditions"], cond.QUOTA_EXHAUSTED)
    q = cond.find(kube.get(QUOTAS, "team-search")["status"]["conditions"], cond.QUOTA_EXHAUSTED)
    assert (a["status"], a["reason"]) == ("True", cond.DAILY_BUDGET_SPENT)
    assert (b["status"], b["reason"]) == ("True", cond.SHARED_BUDGET_SPENT)
    assert (q["status"], q["reason"]) == ("True", cond.DAILY_BUDGET_SPENT)
    ready = cond.find(kube.get(KEYS, "a")["status"]["conditions"], cond.READY)
    assert ready["status"] == "True"  # the usage loop leaves Ready alone


async def test_usage_conflict_is_counted_not_forced(kube, redis):
    await _setup(kube, redis)
    stale = view(kube, KEYS, "a")
    await kube.patch_status(KEYS, "team", "a", {"keyId": "moved-on"})
    await settle(redis, contract.key_subject("team", "a"), 5)
    stats = await usage_cycle(redis, kube, [stale], [], NOW)
    assert stats.conflicts == 1 and stats.patches == 0


def test_plan_counts_keys_per_quota_and_skips_deleting():
    quota = ObjectView("team", "q", "1", 1, {}, {"keys": 1, "observedGeneration": 1}, False)
    keys = [ObjectView("team", n, "1", 1, {"quotaRef": "q"}, {}, n == "gone") for n in ("a", "b", "gone")]
    usages = {contract.quota_subject("team", "q"): contract.Usage(day="d", month="m")}
    todo = plan(keys, [quota], usages, NOW)
    # a and b count for the quota; neither is patched itself before its first reconcile.
    assert [(p[0], p[1].name, p[2]["keys"]) for p in todo] == [(QUOTAS, "q", 2)]


async def test_self_heal_rewrites_identical_config(kube, redis):
    await _setup(kube, redis)
    before = {k: await redis.get(k) for k in await redis.keys("atlas:v2:{config}:key:*")}
    before_quota = await redis.get(contract.quota_config_key("team", "team-search"))
    assert await heal_if_needed(redis, [], [], {}, NOW) is not None  # sets the first epoch
    assert await heal_if_needed(redis, [], [], {}, NOW) is None  # epoch present: nothing to do

    await redis.flushall()
    secrets = {}
    for name in ("a", "b"):
        value = kube.secret_value(f"{name}-api-key")
        secrets[("team", f"{name}-api-key")] = SecretView("1", contract.hash_api_key(value))
    rewritten = await heal_if_needed(
        redis, [view(kube, KEYS, "a"), view(kube, KEYS, "b")], [view(kube, QUOTAS, "team-search")], secrets, NOW
    )
    assert rewritten.rewritten == 3 and not rewritten.failed and await store.epoch_present(redis)
    assert {k: await redis.get(k) for k in await redis.keys("atlas:v2:{config}:key:*")} == before
    assert await redis.get(contract.quota_config_key("team", "team-search")) == before_quota
    for name in ("a", "b"):
        key_hash = secrets[("team", f"{name}-api-key")].key_hash
        assert await redis.hget(contract.KEY_INDEX, f"team/{name}") == key_hash.encode()


async def test_self_heal_keeps_refusal_for_missing_quota(redis):
    key = ObjectView("team", "k", "1", 1, {"quotaRef": "nope"}, {}, False)
    secrets = {("team", "k-api-key"): SecretView("1", contract.hash_api_key("sk-whatever-123"))}
    await heal_if_needed(redis, [key], [], secrets, NOW)
    raw = await redis.get(contract.key_config_key(contract.hash_api_key("sk-whatever-123")))
    assert KeyConfig.decode(raw).refusal == cond.QUOTA_NOT_FOUND


async def test_write_rate_defers_the_least_urgent(kube, redis):
    await _setup(kube, redis)
    await settle(redis, contract.key_subject("team", "a"), 100)  # flips QuotaExhausted: most urgent
    await settle(redis, contract.key_subject("team", "b"), 1)
    views = lambda: ([view(kube, KEYS, "a"), view(kube, KEYS, "b")], [view(kube, QUOTAS, "team-search")])
    kube.patches.clear()
    clock = FakeClock()
    bucket, queue = TokenBucket(1, 1, clock=clock, sleep=clock.sleep), StalenessQueue(clock=clock)
    stats = await usage_cycle(redis, kube, *views(), NOW, bucket=bucket, queue=queue, deadline=clock())
    assert (stats.patches, stats.deferred) == (1, 1) and kube.patches[0][2] == "a"
    clock.now += 1  # one more token
    stats = await usage_cycle(redis, kube, *views(), NOW, bucket=bucket, queue=queue, deadline=clock())
    assert (stats.patches, stats.deferred) == (1, 0) and kube.patches[1][2] == "b"


async def test_usage_patch_deletes_stale_fields_so_it_converges(kube, redis):
    await _setup(kube, redis)
    await settle(redis, contract.key_subject("team", "b"), 5)
    views = lambda: ([view(kube, KEYS, "b")], [])
    await usage_cycle(redis, kube, *views(), NOW)
    assert "lastRequestTime" in kube.get(KEYS, "b")["status"]["usage"]
    await redis.flushall()  # e.g. a new day: no counters, no lastRequestTime
    kube.patches.clear()
    await usage_cycle(redis, kube, *views(), NOW)
    assert kube.patches[0][3]["usage"]["lastRequestTime"] is None
    assert "lastRequestTime" not in kube.get(KEYS, "b")["status"]["usage"]
    assert (await usage_cycle(redis, kube, *views(), NOW)).patches == 0


async def test_quota_budget_shortfall_policy_is_written(kube, redis):
    kube.add(QUOTAS, "shrinking", {"limits": {"tokensPerDay": 100}, "onBudgetShortfall": "Shrink"})
    await reconcile_quota(kube.get(QUOTAS, "shrinking"), kube=kube, redis=redis, key_count=0, now=NOW)
    raw = await redis.get(contract.quota_config_key("team", "shrinking"))
    assert QuotaConfig.decode(raw).shortfall == contract.Shortfall("Shrink", 16)
    assert b'"onBudgetShortfall":"Shrink"' in raw and b"minCompletionTokens" not in raw
