"""The glue between kopf triggers and the reconcile functions, with dict-backed indexes."""

from __future__ import annotations

import base64

from atlas_core import contract
from atlas_core.contract import KeyConfig
from atlas_operator import conditions as cond
from atlas_operator.runtime import Runtime
from atlas_operator.settings import KEYS, QUOTAS, OperatorSettings
from atlas_operator.views import ObjectView, SecretView


def make_runtime(kube, redis) -> Runtime:
    indexes = {n: {} for n in ("atlaskey_views", "atlasquota_views", "keys_by_secret", "keys_by_quota", "secret_views")}
    return Runtime(OperatorSettings(), kube, redis, indexes)


def index_key(rt, kube, name):
    obj = kube.get(KEYS, name)
    spec = obj["spec"]
    rt.indexes["atlaskey_views"][("team", name)] = [ObjectView.of(obj)]
    rt.indexes["keys_by_secret"][("team", spec.get("secretName") or f"{name}-api-key")] = [name]
    if spec.get("quotaRef"):
        rt.indexes["keys_by_quota"].setdefault(("team", spec["quotaRef"]), []).append(name)


def index_quota(rt, kube, name):
    rt.indexes["atlasquota_views"][("team", name)] = [ObjectView.of(kube.get(QUOTAS, name))]


async def test_secret_event_reconciles_only_on_a_real_change(kube, redis):
    rt = make_runtime(kube, redis)
    kube.put_secret("ext", "sk-one-0123456789")
    kube.add(KEYS, "k", {"secretName": "ext"})
    index_key(rt, kube, "k")
    await rt.reconcile_key(kube.get(KEYS, "k"))
    patches = len(kube.patches)
    await rt.secret_changed("team", "ext", kube.secrets[("team", "ext")], deleted=False)
    assert len(kube.patches) == patches  # same value: nothing re-done
    kube.put_secret("ext", "sk-two-0123456789")
    await rt.secret_changed("team", "ext", kube.secrets[("team", "ext")], deleted=False)
    raw = await redis.get(contract.key_config_key(contract.hash_api_key("sk-two-0123456789")))
    assert KeyConfig.decode(raw).name == "k"
    assert await redis.get(contract.key_config_key(contract.hash_api_key("sk-one-0123456789"))) is None
    await rt.secret_changed("team", "unrelated", {"data": {}}, deleted=True)  # no key names it: no-op


async def test_quota_delete_refuses_its_keys(kube, redis):
    rt = make_runtime(kube, redis)
    kube.add(QUOTAS, "q", {"limits": {"tokensPerDay": 10}})
    index_quota(rt, kube, "q")
    kube.add(KEYS, "k", {"quotaRef": "q"})
    index_key(rt, kube, "k")
    await rt.reconcile_quota(kube.get(QUOTAS, "q"))
    outcome = await rt.reconcile_key(kube.get(KEYS, "k"))
    assert outcome.ready
    assert kube.get(QUOTAS, "q")["status"]["keys"] == 1
    await rt.delete_quota(kube.get(QUOTAS, "q"))
    key = kube.secret_value("k-api-key")
    raw = await redis.get(contract.key_config_key(contract.hash_api_key(key)))
    assert KeyConfig.decode(raw).refusal == cond.QUOTA_NOT_FOUND
    ready = cond.find(kube.get(KEYS, "k")["status"]["conditions"], cond.READY)
    assert ready["reason"] == cond.QUOTA_NOT_FOUND


async def test_quota_marked_deleting_does_not_count(kube, redis):
    rt = make_runtime(kube, redis)
    rt.indexes["atlasquota_views"][("team", "q")] = [ObjectView("team", "q", "1", 1, {}, {}, True)]
    assert not rt.quota_exists("team", "q")
    rt.indexes["atlasquota_views"][("team", "q")] = [ObjectView("team", "q", "1", 1, {}, {}, False)]
    assert rt.quota_exists("team", "q")


async def test_heal_and_usage_run_from_the_indexes(kube, redis):
    rt = make_runtime(kube, redis)
    kube.add(KEYS, "k", {})
    index_key(rt, kube, "k")
    await rt.reconcile_key(kube.get(KEYS, "k"))
    value = kube.secret_value("k-api-key")
    rt.indexes["secret_views"][("team", "k-api-key")] = [
        SecretView.of({"metadata": {}, "data": {"api-key": base64.b64encode(value.encode()).decode()}})
    ]
    await redis.flushall()
    assert await rt.heal_once() == 1
    assert await redis.exists(contract.key_config_key(contract.hash_api_key(value)))
    assert await rt.heal_once() is None
    index_key(rt, kube, "k")  # the watch delivered the reconciled status
    stats = await rt.usage_once()
    assert stats.subjects == 1 and stats.patches == 0
