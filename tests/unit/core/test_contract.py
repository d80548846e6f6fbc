"""The Redis contract: key names, config encoding and usage decoding."""

from datetime import datetime, timezone

import fakeredis.aioredis
import pytest

from atlas_core import contract
from atlas_core.contract import KeyConfig, Limits, QuotaConfig

NOW = datetime(2026, 11, 27, 23, 59, 30, tzinfo=timezone.utc)


def test_every_key_is_versioned():
    names = [
        contract.key_config_key("ab" * 32),
        contract.quota_config_key("ns", "q"),
        contract.day_usage_key("k:ns/a", "2026-11-27"),
        contract.month_usage_key("k:ns/a", "2026-11"),
        contract.request_bucket_key("k:ns/a"),
        contract.token_bucket_key("k:ns/a"),
        contract.lease_key("k:ns/a"),
        contract.lease_tokens_key("k:ns/a"),
        contract.CONFIG_EPOCH,
        contract.KEY_INDEX,
        contract.QUOTA_INDEX,
    ]
    assert all(name.startswith("atlas:v2:") for name in names)
    assert len(set(names)) == len(names)


def test_key_hash_and_id_never_contain_the_key():
    key = "sk-atlas-" + "A" * 32
    digest = contract.hash_api_key(key)
    assert len(digest) == 64 and key not in digest
    assert contract.key_id_of(digest) == digest[:8]
    assert contract.key_config_key(digest).endswith(digest)


@pytest.mark.parametrize(
    "spec, burst",
    [
        ({"requestsPerSecond": 5}, 5),
        ({"requestsPerSecond": 2.5}, 3),
        ({"requestsPerSecond": 5, "burst": 10}, 10),
        ({}, None),
    ],
)
def test_effective_burst_defaults_to_ceil_of_rate(spec, burst):
    assert Limits.from_spec(spec).effective_burst == burst


def test_limits_round_trip_keeps_only_set_fields():
    spec = {"requestsPerSecond": 2.5, "tokensPerDay": 1000, "maxConcurrent": 3}
    limits = Limits.from_spec(spec)
    assert limits.to_spec() == spec
    assert limits.tokens_per_month is None


def test_key_config_round_trip():
    cfg = KeyConfig(
        namespace="team",
        name="search",
        key_id="3f9a1c2b",
        limits=Limits(tokens_per_day=100),
        quota="shared",
        models=("llama-*",),
        priority="Sheddable",
        suspended=True,
        expires_at=1798761600.0,
        refusal="QuotaNotFound",
        refusal_message="AtlasQuota team/shared not found",
    )
    assert KeyConfig.decode(cfg.encode()) == cfg
    assert cfg.quota_ref == "team/shared"


def test_minimal_key_config_is_compact_and_decodes_with_defaults():
    raw = KeyConfig(namespace="n", name="k", key_id="00000000").encode()
    assert b"suspended" not in raw and b"refusal" not in raw
    cfg = KeyConfig.decode(raw)
    assert cfg.priority == "Standard" and cfg.models == () and cfg.quota_ref is None


def test_quota_config_round_trip():
    cfg = QuotaConfig(namespace="n", name="q", limits=Limits(tokens_per_month=10))
    assert QuotaConfig.decode(cfg.encode()) == cfg
    shrinking = QuotaConfig(namespace="n", name="q", shortfall=contract.Shortfall("Shrink", 32))
    assert QuotaConfig.decode(shrinking.encode()) == shrinking


def test_shortfall_defaults_are_not_stored_and_decode_back():
    raw = KeyConfig(namespace="n", name="k", key_id="00000000").encode()
    assert b"onBudgetShortfall" not in raw and b"minCompletionTokens" not in raw
    assert KeyConfig.decode(raw).shortfall == contract.Shortfall("Reject", 16)
    cfg = KeyConfig(namespace="n", name="k", key_id="00000000", shortfall=contract.Shortfall("Shrink", 1))
    assert KeyConfig.decode(cfg.encode()).shortfall.shrink


def test_response_owner_encoding():
    raw = contract.encode_response_owner("k:team/app", 123)
    assert contract.decode_response_owner(raw) == ("k:team/app", 123)
    assert contract.decode_response_owner(None) is None
    assert contract.response_owner_key("resp_1").startswith(contract.PREFIX)


def test_usage_keys_follow_the_utc_calendar():
    day_key, month_key = contract.usage_keys("q:n/q", NOW)
    assert day_key.endswith(":d:2026-11-27")
    assert month_key.endswith(":m:2026-11")


async def test_read_usages_in_one_pipeline():
    redis = fakeredis.aioredis.FakeRedis()
    subject = contract.key_subject("n", "k")
    day_key, month_key = contract.usage_keys(subject, NOW)
    await redis.hset(day_key, mapping={"settled": 120, "requests": 3, "last": 1795305570000})
    await redis.hset(month_key, mapping={"settled": 4000})
    usages = await contract.read_usages(redis, [subject, contract.key_subject("n", "idle")], NOW)
    used = usages[subject]
    assert (used.tokens_today, used.tokens_this_month, used.requests_today) == (120, 4000, 3)
    status = used.to_status()
    assert status["day"] == "2026-11-27" and status["month"] == "2026-11"
    assert status["lastRequestTime"].endswith("Z")
    idle = usages[contract.key_subject("n", "idle")].to_status()
    assert idle["tokensToday"] == 0 and "lastRequestTime" not in idle
