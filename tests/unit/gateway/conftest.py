"""Unit-tier helpers for the gateway: fakeredis (with Lua) and principals built in memory."""

from __future__ import annotations

import fakeredis
import pytest

from atlas_core import contract
from atlas_gateway.auth.principal import Principal
from atlas_gateway.ledger.admission import Admission


@pytest.fixture
def fake_redis():
    return fakeredis.FakeAsyncRedis()


@pytest.fixture
def admission(fake_redis) -> Admission:
    return Admission(fake_redis, lease_ttl_seconds=60)


def make_principal(
    key_limits: contract.Limits,
    quota_limits: contract.Limits | None = None,
    name: str = "app",
    quota_shortfall: contract.Shortfall | None = None,
    **key_fields,
) -> Principal:
    key = contract.KeyConfig(
        "team", name, "0123abcd", key_limits, quota="shared" if quota_limits is not None else None, **key_fields
    )
    quota = (
        contract.QuotaConfig("team", "shared", quota_limits, quota_shortfall or contract.Shortfall())
        if quota_limits is not None
        else None
    )
    return Principal(key, quota)
