"""AtlasKey reconcile called directly: fakeredis + an in-memory Kubernetes API."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from atlas_core import contract
from atlas_core.contract import KeyConfig
from atlas_operator import conditions as cond
from atlas_operator.keys import reconcile_key
from atlas_operator.settings import KEYS, SECRET_WATCH_LABEL
from atlas_operator.status import StatusConflict

NOW = datetime(2026, 11, 27, 12, 0, tzinfo=timezone.utc)
GOOD_KEY = "sk-test-0123456789abcdef"


def ready(obj):
    return cond.find(obj["status"]["conditions"], cond.READY)


def condition(obj, ctype):
    return cond.find(obj["status"]["conditions"], ctype)


def verdict(obj) -> tuple:
    """(Ready, Serving, Stalled) as statuses, with Stalled None when absent (kstatus's reading)."""
    stalled = condition(obj, cond.STALLED)
    return (ready(obj)["status"], condition(obj, cond.SERVING)["status"], stalled and stalled["status"])


async def run(kube, redis, name="frontend", quotas=(), now=NOW):
    return await reconcile_key(
        kube.get(KEYS, name), kube=kube, redis=redis, quota_exists=lambda ns, q: q in quotas, now=now
    )


async def config_for(redis, key: str) -> KeyConfig | None:
    raw = await redis.get(contract.key_config_key(contract.hash_api_key(key)))
    return KeyConfig.decode(raw) if raw else None


async def test_generates_owned_secret_and_writes_config(kube, redis):
    kube.add(KEYS, "frontend", {"limits": {"tokensPerDay": 1000}, "priority": "Critical"})
    outcome = await run(kube, redis)
    assert outcome.ready and outcome.secret_created
    secret = kube.secrets[("team", "frontend-api-key")]
    owner = secret["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["name"], owner["controller"]) == ("AtlasKey", "frontend", True)
    key = kube.secret_value("frontend-api-key")
    assert key.startswith("sk-atlas-") and len(key) == 41 and key[9:].isalnum()
    config = await config_for(redis, key)
    assert config.ref == "team/frontend" and config.priority == "Critical"
    assert config.limits.tokens_per_day == 1000 and config.refusal is None
    obj = kube.get(KEYS, "frontend")
    assert obj["status"]["keyId"] == contract.key_id_of(contract.hash_api_key(key))
    assert obj["status"]["observedGeneration"] == 1
    assert verdict(obj) == ("True", "True", None)
    assert cond.find(obj["status"]["conditions"], cond.QUOTA_EXHAUSTED)["status"] == "False"
    assert obj["status"]["usage"]["tokensToday"] == 0
    assert [e[2] for e in kube.events] == ["SecretGenerated", cond.ACTIVE]
    assert key not in repr(kube.events) and key not in repr(obj["status"])


async def test_second_run_writes_nothing(kube, redis):
    kube.add(KEYS, "frontend", {})
    await run(kube, redis)
    patches, events = len(kube.patches), len(kube.events)
    outcome = await run(kube, redis)
    assert not outcome.redis_written and not outcome.status_patched and not outcome.secret_created
    assert len(kube.patches) == patches and len(kube.events) == events


async def test_existing_secret_is_used_as_is(kube, redis):
    kube.put_secret("external", GOOD_KEY + "\n")
    kube.add(KEYS, "frontend", {"secretName": "external"})
    outcome = await run(kube, redis)
    assert outcome.ready and not outcome.secret_created and not kube.created_secrets
    assert (await config_for(redis, GOOD_KEY)).name == "frontend"


async def test_unlabelled_secret_works_and_says_how_to_get_it_watched(kube, redis):
    """Only labelled Secrets are watched; an existing install's unlabelled Secret still works
    (read by name) and the Ready message names the label to add (the migration)."""
    kube.put_secret("external", GOOD_KEY)
    kube.add(KEYS, "frontend", {"secretName": "external"})
    outcome = await run(kube, redis)
    assert outcome.ready and f"lacks the label {SECRET_WATCH_LABEL}=frontend" in outcome.message
    kube.secrets[("team", "external")]["metadata"].setdefault("labels", {})[SECRET_WATCH_LABEL] = "frontend"
    outcome = await run(kube, redis)
    assert outcome.ready and "lacks the label" not in outcome.message
    assert "lacks the label" not in ready(kube.get(KEYS, "frontend"))["message"]
    kube.add(KEYS, "generated", {})
    generated = await run(kube, redis, name="generated")  # the operator labels what it generates
    assert generated.ready and "lacks the label" not in generated.message
    assert kube.secrets[("team", "generated-api-key")]["metadata"]["labels"][SECRET_WATCH_LABEL] == "generated"


@pytest.mark.parametrize("raw", [{}, {"api-key": "%%%not-base64"}, {"api-key": "c2hvcnQ="}])
async def test_invalid_secret_is_not_ready_and_removes_old_config(kube, redis, raw):
    kube.put_secret("external", GOOD_KEY)
    kube.add(KEYS, "frontend", {"secretName": "external"})
    await run(kube, redis)
    kube.put_secret("external", None, raw=raw)
    outcome = await run(kube, redis)
    assert not outcome.ready and outcome.reason == cond.SECRET_INVALID
    assert await config_for(redis, GOOD_KEY) is None
    obj = kube.get(KEYS, "frontend")
    assert ready(obj)["reason"] == cond.SECRET_INVALID and "keyId" not in obj["status"]
    assert verdict(obj) == ("False", "False", "True")  # a configuration error: kstatus Failed
    assert condition(obj, cond.STALLED)["message"] == ready(obj)["message"]
    assert ("frontend", "Warning", cond.SECRET_INVALID) in [e[:3] for e in kube.events]


async def test_rotation_replaces_config_and_keeps_usage(kube, redis):
    kube.put_secret("external", GOOD_KEY)
    kube.add(KEYS, "frontend", {"secretName": "external"})
    await run(kube, redis)
    day_key, _ = contract.usage_keys(contract.key_subject("team", "frontend"), NOW)
    await redis.hset(day_key, mapping={"settled": 42, "requests": 1})
    kube.put_secret("external", "sk-rotated-key-000000000")
    outcome = await run(kube, redis)
    assert outcome.rotated_from == contract.hash_api_key(GOOD_KEY)
    assert await config_for(redis, GOOD_KEY) is None
    assert (await config_for(redis, "sk-rotated-key-000000000")).name == "frontend"
    assert (
        await redis.hget(contract.KEY_INDEX, "team/frontend")
        == contract.hash_api_key("sk-rotated-key-000000000").encode()
    )
    assert int(await redis.hget(day_key, "settled")) == 42
    assert "KeyRotated" in [e[2] for e in kube.events]
    assert kube.get(KEYS, "frontend")["status"]["keyId"] == contract.key_id_of(
        contract.hash_api_key("sk-rotated-key-000000000")
    )


async def test_missing_quota_refuses_never_unlimited(kube, redis):
    kube.put_secret("external", GOOD_KEY)
    kube.add(KEYS, "frontend", {"secretName": "external", "quotaRef": "team-search"})
    outcome = await run(kube, redis)
    assert not outcome.ready and outcome.reason == cond.QUOTA_NOT_FOUND
    config = await config_for(redis, GOOD_KEY)
    assert config.refusal == cond.QUOTA_NOT_FOUND and "team-search" in config.refusal_message
    obj = kube.get(KEYS, "frontend")
    assert verdict(obj) == ("False", "False", "True") and condition(obj, cond.STALLED)["reason"] == cond.QUOTA_NOT_FOUND
    # The quota appears: the same function lifts the refusal, and Stalled goes away.
    outcome = await run(kube, redis, quotas=("team-search",))
    assert outcome.ready and (await config_for(redis, GOOD_KEY)).refusal is None
    assert verdict(kube.get(KEYS, "frontend")) == ("True", "True", None)


async def test_suspended_and_expired(kube, redis):
    kube.put_secret("external", GOOD_KEY)
    kube.add(KEYS, "frontend", {"secretName": "external", "suspended": True})
    outcome = await run(kube, redis)
    assert outcome.reason == cond.SUSPENDED and (await config_for(redis, GOOD_KEY)).suspended
    # suspended on purpose: in effect as declared (Ready, kstatus Current), refusing traffic
    obj = kube.get(KEYS, "frontend")
    assert outcome.ready and not outcome.serving and verdict(obj) == ("True", "False", None)
    assert condition(obj, cond.SERVING)["reason"] == cond.SUSPENDED
    assert "refuses the key" in condition(obj, cond.SERVING)["message"]
    assert ("Normal", cond.SUSPENDED) in [e[1:3] for e in kube.events]
    expires = NOW + timedelta(minutes=5)
    kube.update_spec(KEYS, "frontend", {"secretName": "external", "expiresAt": "2026-11-27T12:05:00Z"})
    outcome = await run(kube, redis)
    assert outcome.ready and outcome.next_check == expires
    assert (await config_for(redis, GOOD_KEY)).expires_at == expires.timestamp()
    outcome = await run(kube, redis, now=expires + timedelta(seconds=1))
    assert outcome.ready and not outcome.serving and outcome.reason == cond.EXPIRED and outcome.next_check is None
    obj = kube.get(KEYS, "frontend")
    assert ready(obj)["reason"] == cond.EXPIRED and obj["status"]["observedGeneration"] == 2
    assert verdict(obj) == ("True", "False", None)
    assert {c["observedGeneration"] for c in obj["status"]["conditions"] if c["type"] != cond.QUOTA_EXHAUSTED} == {2}


async def test_ready_transition_time_kept_when_unchanged(kube, redis):
    kube.add(KEYS, "frontend", {})
    await run(kube, redis)
    first = ready(kube.get(KEYS, "frontend"))["lastTransitionTime"]
    kube.update_spec(KEYS, "frontend", {"priority": "Sheddable"})
    await run(kube, redis, now=NOW + timedelta(hours=1))
    obj = kube.get(KEYS, "frontend")
    assert ready(obj)["lastTransitionTime"] == first and obj["status"]["observedGeneration"] == 2


async def test_same_key_in_two_atlaskeys_is_refused_for_the_second(kube, redis):
    kube.put_secret("shared", GOOD_KEY)
    kube.add(KEYS, "first", {"secretName": "shared"})
    kube.add(KEYS, "second", {"secretName": "shared"})
    assert (await run(kube, redis, name="first")).ready
    outcome = await run(kube, redis, name="second")
    assert not outcome.ready and outcome.reason == cond.SECRET_INVALID and "team/first" in outcome.message
    assert (await config_for(redis, GOOD_KEY)).name == "first"


async def test_stale_body_raises_conflict(kube, redis):
    kube.add(KEYS, "frontend", {})
    stale = kube.get(KEYS, "frontend")
    kube.objects[(KEYS, "team", "frontend")]["metadata"]["resourceVersion"] = "999999"
    with pytest.raises(StatusConflict):
        await reconcile_key(stale, kube=kube, redis=redis, quota_exists=lambda *_: False, now=NOW)


async def test_delete_removes_config_keeps_counters(kube, redis):
    from atlas_operator.keys import delete_key

    kube.put_secret("external", GOOD_KEY)
    kube.add(KEYS, "frontend", {"secretName": "external"})
    await run(kube, redis)
    _, month_key = contract.usage_keys(contract.key_subject("team", "frontend"), NOW)
    await redis.hset(month_key, "settled", 7)
    assert await delete_key(kube.get(KEYS, "frontend"), redis=redis)
    assert await config_for(redis, GOOD_KEY) is None
    assert await redis.hget(contract.KEY_INDEX, "team/frontend") is None
    assert int(await redis.hget(month_key, "settled")) == 7
    assert not await delete_key(kube.get(KEYS, "frontend"), redis=redis)  # idempotent


async def test_budget_shortfall_policy_is_written_for_the_gateway(kube, redis):
    kube.add(
        KEYS, "shrinker", {"limits": {"tokensPerDay": 1000}, "onBudgetShortfall": "Shrink", "minCompletionTokens": 64}
    )
    await run(kube, redis, name="shrinker")
    config = await config_for(redis, kube.secret_value("shrinker-api-key"))
    assert config.shortfall == contract.Shortfall("Shrink", 64)
    kube.add(KEYS, "plain", {"limits": {"tokensPerDay": 1000}})
    await run(kube, redis, name="plain")
    config = await config_for(redis, kube.secret_value("plain-api-key"))
    assert config.shortfall == contract.Shortfall("Reject", contract.DEFAULT_MIN_COMPLETION_TOKENS)
