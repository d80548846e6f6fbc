"""The operator's Redis side on a real Redis Cluster (redis-py's asyncio RedisCluster, as the
operator runs it): config reconciles (MULTI blocks in the {config} slot), rotation, the bulk
rewrite of self-healing, usage write-back and forecast histories (pipelines across nodes), and
the v1 carry-over (v1 hashes in many slots, each v2 hash updated by a one-key script)."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster

from atlas_core import cluster, contract
from atlas_operator.carry_over import CarryOver
from atlas_operator.heal import heal_if_needed
from atlas_operator.history import History
from atlas_operator.keys import reconcile_key
from atlas_operator.quotas import reconcile_quota
from atlas_operator.settings import KEYS, QUOTAS
from atlas_operator.usage import usage_cycle
from atlas_operator.views import ObjectView, SecretView
from tests.unit.operator.fakes import FakeKube

NOW = datetime.now(timezone.utc)


@pytest.fixture
async def aredis(redis_cluster, cluster_client):
    client = cluster.redis_py_client(
        redis_cluster.url, True, socket_timeout=5, socket_connect_timeout=5, health_check_interval=30
    )
    assert isinstance(client, AsyncRedisCluster)
    yield client
    await client.aclose()


def view(kube, plural, name):
    return ObjectView.of(kube.get(plural, name))


async def test_operator_writes_config_and_reads_usage_on_a_cluster(aredis, cluster_client):
    kube = FakeKube()
    names = [f"k{i}" for i in range(12)]
    kube.add(QUOTAS, "pool", {"limits": {"tokensPerDay": 1000}})
    await reconcile_quota(kube.get(QUOTAS, "pool"), kube=kube, redis=aredis, key_count=6, now=NOW)
    for i, name in enumerate(names):  # half bound to the quota, half on their own slots
        kube.add(KEYS, name, {"quotaRef": "pool"} if i % 2 else {"limits": {"tokensPerDay": 500}})
        outcome = await reconcile_key(
            kube.get(KEYS, name), kube=kube, redis=aredis, quota_exists=lambda *_: True, now=NOW
        )
        assert outcome.redis_written
    assert cluster_client.hlen(contract.KEY_INDEX) == 12

    # counters as the gateway writes them: every key's own slot, or its quota's
    subjects = {name: contract.key_subject("team", name) for name in names}
    for i, name in enumerate(names):
        tag = contract.quota_subject("team", "pool") if i % 2 else None
        day, month = contract.usage_keys(subjects[name], NOW, tag)
        cluster_client.hset(day, mapping={"settled": 10 + i, "requests": 1})
        cluster_client.hset(month, mapping={"settled": 100 + i})
    slots = {cluster.key_slot(contract.usage_keys(subjects[n], NOW)[0]) for n in names[::2]}
    assert len(slots) > 1  # keys without a quota really are spread over the cluster

    history = History()
    stats = await usage_cycle(
        aredis, kube, [view(kube, KEYS, n) for n in names], [view(kube, QUOTAS, "pool")], NOW, history=history
    )
    assert stats.subjects == 13
    for i, name in enumerate(names):
        assert kube.get(KEYS, name)["status"]["usage"]["tokensToday"] == 10 + i
    await history.flush(aredis)
    assert await History().load(aredis, list(subjects.values())) >= 1

    # self-healing: Redis lost its config (a FLUSHALL on every master); rewritten across the cluster
    cluster_client.flushall(target_nodes=cluster_client.PRIMARIES)
    secrets = {
        ("team", f"{n}-api-key"): SecretView("1", contract.hash_api_key(kube.secret_value(f"{n}-api-key")))
        for n in names
    }
    healed = await heal_if_needed(
        aredis, [view(kube, KEYS, n) for n in names], [view(kube, QUOTAS, "pool")], secrets, NOW
    )
    assert (healed.rewritten, healed.failed) == (13, []) and cluster_client.exists(contract.CONFIG_EPOCH)


async def test_v1_usage_carried_over_on_a_cluster(aredis, cluster_client):
    """v1 hashes (untagged: spread over every master) mirrored into the tagged v2 hashes."""
    cluster_client.set(contract.V1_CONFIG_EPOCH, "1")
    quota = contract.quota_subject("team", "pool")
    subjects = [contract.key_subject("team", f"k{i}") for i in range(8)] + [quota]
    tags = {s: quota for s in subjects[:8:2]}  # every other key is bound to the quota
    for i, subject in enumerate(subjects):
        day, month = contract.v1_usage_keys(subject, NOW)
        cluster_client.hset(day, mapping={"settled": 100 + i, "requests": 2})
        cluster_client.hset(month, mapping={"settled": 1000 + i})
    carry = CarryOver()
    await carry.cycle(aredis, subjects, NOW, tags)
    await carry.cycle(aredis, subjects, NOW, tags)  # idempotent
    usages = await contract.read_usages(aredis, subjects, NOW, tags)
    for i, subject in enumerate(subjects):
        assert (usages[subject].tokens_today, usages[subject].tokens_this_month, usages[subject].requests_today) == (
            100 + i,
            1000 + i,
            2,
        )
    assert carry.carried == 3 * len(subjects)  # day settled + requests, month settled; once each
