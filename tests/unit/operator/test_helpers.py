"""Small pure pieces: conditions, key material, settings, the expiry heap."""

from __future__ import annotations

import base64
from datetime import datetime, timedelta, timezone

from atlas_operator import apikeys
from atlas_operator import conditions as cond
from atlas_operator.expiry import ExpiryScheduler
from atlas_operator.settings import OperatorSettings

NOW = datetime(2026, 11, 27, 12, 0, tzinfo=timezone.utc)


def test_merge_keeps_other_conditions_and_transition_time():
    first = cond.merge(None, cond.READY, True, "Active", "ok", 1, NOW)
    both = cond.merge(first, cond.QUOTA_EXHAUSTED, False, "WithinBudget", "ok", 1, NOW)
    later = cond.merge(both, cond.READY, True, "Active", "ok", 2, NOW + timedelta(hours=1))
    assert [c["type"] for c in later] == [cond.READY, cond.QUOTA_EXHAUSTED]
    assert later[0]["lastTransitionTime"] == "2026-11-27T12:00:00Z" and later[0]["observedGeneration"] == 2
    flipped = cond.merge(later, cond.READY, False, "Suspended", "x", 2, NOW + timedelta(hours=2))
    assert flipped[0]["lastTransitionTime"] == "2026-11-27T14:00:00Z" and flipped[1] == later[1]


def test_generated_keys_are_distinct_base62():
    keys = {apikeys.generate_api_key() for _ in range(200)}
    assert len(keys) == 200
    assert all(k.startswith("sk-atlas-") and len(k) == 41 and k[9:].isalnum() for k in keys)


def test_read_api_key_variants():
    enc = lambda s: {"data": {"api-key": base64.b64encode(s.encode()).decode()}}
    assert apikeys.read_api_key(enc("sk-abcdefgh\n")) == ("sk-abcdefgh", "")
    assert apikeys.read_api_key(None)[0] is None
    assert "api-key" in apikeys.read_api_key({"data": {"other": "eA=="}})[1]
    assert apikeys.read_api_key(enc("has space inside"))[0] is None
    assert apikeys.read_api_key(enc("short"))[0] is None


def test_settings_from_env():
    s = OperatorSettings.from_env(
        {"ATLAS_NAMESPACES": "a, b,,", "ATLAS_USAGE_INTERVAL_SECONDS": "2.5", "ATLAS_LIVENESS_PORT": "9000"}
    )
    assert s.namespaces == ("a", "b") and s.usage_interval == 2.5
    assert s.liveness_endpoint == "http://127.0.0.1:9000/healthz"
    default = OperatorSettings.from_env({})
    assert default.namespaces == () and default.usage_interval == 10.0
    assert OperatorSettings.from_env({"ATLAS_LIVENESS_PORT": "0"}).liveness_endpoint is None


async def test_expiry_heap_orders_and_dedups():
    fired = []

    async def fire(ns, name):
        fired.append(name)

    sched = ExpiryScheduler(fire)
    sched.schedule("t", "late", NOW + timedelta(seconds=20))
    sched.schedule("t", "early", NOW + timedelta(seconds=10))
    sched.schedule("t", "early", NOW + timedelta(seconds=5))
    assert sched.next_at() == (NOW + timedelta(seconds=5)).timestamp()
    assert sched.due((NOW + timedelta(seconds=11)).timestamp()) == [("t", "early")]
    assert sched.due((NOW + timedelta(seconds=30)).timestamp()) == [("t", "late")]
    assert sched.next_at() is None
