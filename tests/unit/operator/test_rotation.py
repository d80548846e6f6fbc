"""Rotation with overlap: the state machine, and reconcile through it (fakeredis, fake API)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from atlas_core import contract
from atlas_core.contract import KeyConfig, PreviousKey
from atlas_operator import rotation
from atlas_operator.keys import reconcile_key
from atlas_operator.settings import KEYS

OLD, NEW, NEWER = "sk-old-key-0123456789", "sk-new-key-0123456789", "sk-newer-key-012345678"
H_OLD, H_NEW, H_NEWER = (contract.hash_api_key(k) for k in (OLD, NEW, NEWER))


# --------------------------------------------------------------------------- the state machine


@pytest.mark.parametrize(
    "text,seconds", [("0", 0), ("", 0), (None, 0), ("3s", 3), ("10m", 600), ("1h30m", 5400), ("2h0m5s", 7205)]
)
def test_parse_duration(text, seconds):
    assert rotation.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["10", "10 m", "1d", "m", "-5s"])
def test_parse_duration_refuses_what_the_crd_refuses(text):
    with pytest.raises(ValueError):
        rotation.parse_duration(text)


def test_no_grace_drops_the_old_key_at_once():
    s = rotation.step(H_OLD, None, H_NEW, 0, 1000.0)
    assert s == rotation.RotationStep(None, (H_OLD,), rotated_from=H_OLD)


def test_grace_keeps_the_old_key_until_the_deadline_then_retires_it():
    s = rotation.step(H_OLD, None, H_NEW, 600, 1000.0)
    assert s == rotation.RotationStep(PreviousKey(H_OLD, 1600.0), (), rotated_from=H_OLD)
    during = rotation.step(H_NEW, s.previous, H_NEW, 600, 1599.0)
    assert during == rotation.RotationStep(PreviousKey(H_OLD, 1600.0))  # nothing changes
    after = rotation.step(H_NEW, s.previous, H_NEW, 600, 1600.0)
    assert after == rotation.RotationStep(None, (H_OLD,), retired=H_OLD)
    assert rotation.step(H_NEW, None, H_NEW, 600, 1700.0) == rotation.RotationStep(None)


def test_rotating_again_during_the_grace_drops_the_oldest_at_once():
    s = rotation.step(H_NEW, PreviousKey(H_OLD, 1600.0), H_NEWER, 600, 1100.0)
    assert s == rotation.RotationStep(PreviousKey(H_NEW, 1700.0), (H_OLD,), rotated_from=H_NEW)


def test_rotating_back_to_the_previous_key_ends_the_overlap():
    back = rotation.step(H_NEW, PreviousKey(H_OLD, 1600.0), H_OLD, 600, 1100.0)
    assert back == rotation.RotationStep(PreviousKey(H_NEW, 1700.0), (), rotated_from=H_NEW)
    settled = rotation.step(H_OLD, PreviousKey(H_OLD, 1600.0), H_OLD, 600, 1100.0)
    assert settled == rotation.RotationStep(None)


# --------------------------------------------------------------------------- through reconcile


def now_utc() -> datetime:  # real time: Redis expires the previous key's entry by the wall clock
    return datetime.now(timezone.utc).replace(microsecond=0)


async def run(kube, redis, now):
    return await reconcile_key(kube.get(KEYS, "web"), kube=kube, redis=redis, quota_exists=lambda *_: True, now=now)


async def config(redis, key_hash):
    raw = await redis.get(contract.key_config_key(key_hash))
    return KeyConfig.decode(raw) if raw else None


async def test_grace_period_serves_both_keys_with_one_identity_then_only_the_new(kube, redis):
    now = now_utc()
    kube.put_secret("web-key", OLD)
    kube.add(KEYS, "web", {"secretName": "web-key", "rotationGracePeriod": "10m", "limits": {"tokensPerDay": 1000}})
    await run(kube, redis, now)
    kube.put_secret("web-key", NEW)
    rotated = await run(kube, redis, now)

    old, new = await config(redis, H_OLD), await config(redis, H_NEW)
    assert (old.namespace, old.name) == (new.namespace, new.name) == ("team", "web")  # one usage identity
    assert old.limits == new.limits and old.key_id == H_OLD[:8] and new.key_id == H_NEW[:8]
    deadline = now + timedelta(minutes=10)
    assert old.expires_at == deadline.timestamp() and new.expires_at is None
    ttl_ms = await redis.pttl(contract.key_config_key(H_OLD))
    assert 0 < ttl_ms <= 600_000  # Redis drops it at the deadline even without the operator
    status = kube.get(KEYS, "web")["status"]
    assert status["keyId"] == H_NEW[:8]
    assert status["previousKey"] == {"keyId": H_OLD[:8], "expiresAt": deadline.strftime("%Y-%m-%dT%H:%M:%SZ")}
    assert rotated.next_check == deadline
    event = next(e for e in kube.events if e[2] == "KeyRotated")
    assert H_OLD[:8] in event[3] and "keeps working until" in event[3]

    # a spec change during the grace reaches the previous key too (same identity, same limits)
    kube.update_spec(
        KEYS, "web", {"secretName": "web-key", "rotationGracePeriod": "10m", "limits": {"tokensPerDay": 5}}
    )
    await run(kube, redis, now + timedelta(minutes=1))
    assert (await config(redis, H_OLD)).limits.tokens_per_day == 5

    retired = await run(kube, redis, deadline)  # the expiry scheduler's re-reconcile
    assert retired.retired == H_OLD and retired.next_check is None
    assert await config(redis, H_OLD) is None and await config(redis, H_NEW) is not None
    assert await redis.hget(contract.PREVIOUS_KEY_INDEX, "team/web") is None
    assert "previousKey" not in kube.get(KEYS, "web")["status"]
    assert [e[2] for e in kube.events].count("PreviousKeyRetired") == 1
    again = await run(kube, redis, deadline + timedelta(seconds=5))
    assert not again.redis_written and not again.status_patched


async def test_without_grace_the_old_key_is_refused_at_once(kube, redis):
    now = now_utc()
    kube.put_secret("web-key", OLD)
    kube.add(KEYS, "web", {"secretName": "web-key"})
    await run(kube, redis, now)
    kube.put_secret("web-key", NEW)
    outcome = await run(kube, redis, now)
    assert outcome.previous is None and await config(redis, H_OLD) is None
    assert "previousKey" not in kube.get(KEYS, "web")["status"]


async def test_deleting_the_key_during_the_grace_refuses_both(kube, redis):
    from atlas_operator.keys import delete_key

    now = now_utc()
    kube.put_secret("web-key", OLD)
    kube.add(KEYS, "web", {"secretName": "web-key", "rotationGracePeriod": "1h"})
    await run(kube, redis, now)
    kube.put_secret("web-key", NEW)
    await run(kube, redis, now)
    assert await delete_key(kube.get(KEYS, "web"), redis=redis)
    assert await config(redis, H_OLD) is None and await config(redis, H_NEW) is None
    assert await redis.hget(contract.PREVIOUS_KEY_INDEX, "team/web") is None
