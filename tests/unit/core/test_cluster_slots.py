"""Redis Cluster: every key of one script call in one slot; slot maths; the v1 carry-over."""

from datetime import datetime, timezone

import fakeredis
import pytest

from atlas_core import cluster, contract
from atlas_gateway.auth.principal import Principal
from atlas_gateway.ledger.admission import Admission
from atlas_gateway.ledger.script_args import ScriptCalls
from atlas_gateway.store.cluster import first_key
from atlas_gateway.store.fastredis import pack
from atlas_operator.carry_over import CarryOver

NOW = datetime(2026, 11, 27, 12, 0, tzinfo=timezone.utc)


def test_key_slot_matches_redis_cluster_spec():
    # values from the Redis Cluster specification / CLUSTER KEYSLOT
    assert cluster.key_slot("foo") == 12182
    assert cluster.key_slot("123456789") == 12739
    assert cluster.key_slot("{user1000}.following") == cluster.key_slot("user1000")
    assert cluster.key_slot("foo{}{bar}") == cluster.key_slot("foo{}{bar}".encode())  # empty tag: whole key


@pytest.mark.parametrize("quota", [None, "shared"])
def test_every_key_of_every_script_call_shares_one_slot(quota):
    key = contract.KeyConfig(
        "team", "app", "0123abcd", contract.Limits(tokens_per_day=10, max_concurrent=2), quota=quota
    )
    quota_config = contract.QuotaConfig("team", "shared", contract.Limits(tokens_per_day=5)) if quota else None
    principal = Principal(key, quota_config)
    calls = ScriptCalls(60)
    admit, settle = calls.shapes(principal, "2026-11-27", "2026-11")
    admit_keys = admit.keys
    every = (
        admit.keys
        + settle.keys
        + calls.undo_shape(principal, "2026-11-27", "2026-11").keys
        + calls.refresh_shape(principal).keys
    )
    assert len({cluster.key_slot(k) for k in every}) == 1
    expected_tag = contract.quota_subject("team", "shared") if quota else contract.key_subject("team", "app")
    assert all(k.decode().startswith(f"atlas:v2:{{{expected_tag}}}:") for k in every)
    # the quota's own counters (read by the operator without any key) are in that slot too
    if quota:
        q_day, _ = contract.usage_keys(contract.quota_subject("team", "shared"), NOW)
        assert cluster.key_slot(q_day) == cluster.key_slot(admit_keys[0])


def test_config_keys_share_one_slot_for_the_operators_transactions():
    names = [
        contract.key_config_key("ab" * 32),
        contract.quota_config_key("n", "q"),
        contract.KEY_INDEX,
        contract.QUOTA_INDEX,
        contract.PREVIOUS_KEY_INDEX,
        contract.CONFIG_EPOCH,
    ]
    assert len({cluster.key_slot(n) for n in names}) == 1


def test_first_key_routes_scripts_by_their_first_key():
    assert first_key(pack((b"EVALSHA", b"a" * 40, b"2", b"{t}:x", b"{t}:y", b"arg"))) == b"{t}:x"
    assert first_key(pack((b"EVALSHA", b"a" * 40, b"0", b"arg"))) is None
    assert first_key(pack((b"GET", b"k"))) == b"k"
    assert first_key(pack((b"PING",))) is None


def test_parse_mode():
    assert [cluster.parse_mode(v) for v in (None, "", "auto", "TRUE", "1", "off")] == [
        "auto",
        "auto",
        "auto",
        "true",
        "true",
        "false",
    ]
    with pytest.raises(ValueError, match="ATLAS_REDIS_CLUSTER"):
        cluster.parse_mode("sometimes")


async def test_carry_over_mirrors_v1_usage_once_and_follows_later_v1_traffic():
    redis = fakeredis.FakeAsyncRedis()
    key, quota = contract.key_subject("team", "app"), contract.quota_subject("team", "shared")
    tags = {key: quota}
    v1_day, v1_month = contract.v1_usage_keys(key, NOW)
    await redis.hset(v1_day, mapping={"settled": 700, "requests": 7, "last": 1_795_000_000_000})
    await redis.hset(v1_month, mapping={"settled": 9000})
    carry = CarryOver()
    await carry.cycle(redis, [key, quota], NOW, tags)
    assert carry.active is False  # no v1 epoch: no upgrade in progress, nothing read or written
    assert await redis.keys("atlas:v2:*") == []

    await redis.set(contract.V1_CONFIG_EPOCH, "1")
    for _ in range(2):  # repeated cycles carry nothing twice
        await carry.cycle(redis, [key, quota], NOW, tags)
    usage = (await contract.read_usages(redis, [key], NOW, tags))[key]
    assert (usage.tokens_today, usage.tokens_this_month, usage.requests_today) == (700, 9000, 7)
    assert usage.last_request_ms == 1_795_000_000_000
    v2_day, _ = contract.usage_keys(key, NOW, quota)
    assert 0 < await redis.ttl(v2_day) <= contract.DAY_TTL_SECONDS

    # a v1 gateway still serving (rolling upgrade), and v2 traffic meanwhile: both count
    await redis.hincrby(v1_day, "settled", 50)
    await redis.hincrby(v2_day, "settled", 25)
    await carry.cycle(redis, [key, quota], NOW, tags)
    assert (await contract.read_usages(redis, [key], NOW, tags))[key].tokens_today == 775


async def test_admission_runs_with_the_tagged_keys_after_a_carry_over():
    """The v2 scripts see carried usage: a budget spent under v1 stays spent under v2."""
    redis = fakeredis.FakeAsyncRedis()
    key = contract.KeyConfig("team", "app", "0123abcd", contract.Limits(tokens_per_day=1000))
    subject = contract.key_subject("team", "app")
    await redis.set(contract.V1_CONFIG_EPOCH, "1")
    await redis.hset(contract.v1_usage_keys(subject, datetime.now(timezone.utc))[0], mapping={"settled": 950})
    await CarryOver().cycle(redis, [subject], datetime.now(timezone.utc), {})
    admission = Admission(redis, lease_ttl_seconds=60)
    principal = Principal(key, None)
    assert not (await admission.admit(principal, "r1", 100)).admitted
    assert (await admission.admit(principal, "r2", 50)).admitted
