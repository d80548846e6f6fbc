"""The running totals next to the leases (lease:sum) on fakeredis: whatever mix of admissions,
settlements, undos, refreshes and expiries, they equal the sum of the live leases after every
call, and once nothing is in flight they are gone (exactly 0: no leaked reservation)."""

from __future__ import annotations

import asyncio

import fakeredis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from atlas_core import contract
from atlas_gateway.ledger.admission import Admission

from .conftest import make_principal

KEY = contract.key_subject("team", "app")
QUOTA = contract.quota_subject("team", "shared")
SUBJECTS = (KEY, QUOTA)

# generous limits (every lease-holding kind on): the totals are the subject, not the refusals
PRINCIPAL = make_principal(
    contract.Limits(max_concurrent=6, tokens_per_day=5_000, cost_per_day=1.0),
    contract.Limits(tokens_per_month=8_000, cost_per_month=2.0),
)

OPS = st.lists(
    st.tuples(
        st.sampled_from(["admit", "settle", "undo_admit", "undo_settle", "expire", "refresh"]),
        st.integers(0, 7),
        st.integers(1, 900),
        st.integers(0, 900),
    ),
    max_size=40,
)


async def assert_totals_match_leases(redis) -> None:
    for subject in SUBJECTS:
        leases = await redis.zcard(contract.lease_key(subject, QUOTA))
        tokens = sum(int(v) for v in await redis.hvals(contract.lease_tokens_key(subject, QUOTA)))
        cost = sum(int(v) for v in await redis.hvals(contract.lease_cost_key(subject, QUOTA)))
        totals = await redis.hgetall(contract.lease_sum_key(subject, QUOTA))
        if leases == 0:
            assert totals == {}, subject  # nothing in flight: the totals are gone, exactly 0
        else:
            assert (int(totals[b"n"]), int(totals[b"tok"]), int(totals[b"cost"])) == (leases, tokens, cost), subject


async def run(ops) -> None:
    redis = fakeredis.FakeAsyncRedis()
    admission = Admission(redis, lease_ttl_seconds=60)
    reserved: dict[str, int] = {}
    for op, n, tokens, actual in ops:
        rid = f"r{n}"
        if op == "admit":
            decision = await admission.admit(PRINCIPAL, rid, tokens, costs=(str(tokens * 10).encode(), b"333"))
            if decision.admitted:
                reserved[rid] = decision.reserved
        elif op == "settle":
            await admission.settle(PRINCIPAL, rid, reserved.get(rid, tokens), actual, costs=(b"5", b"6"))
        elif op in ("undo_admit", "undo_settle"):
            await admission.undo(PRINCIPAL, rid, reserved.get(rid, tokens), actual, admission=op == "undo_admit")
        elif op == "expire":  # the gateway holding it died: its lease expiry passes
            for subject in SUBJECTS:
                if await redis.zscore(contract.lease_key(subject, QUOTA), rid) is not None:
                    await redis.zadd(contract.lease_key(subject, QUOTA), {rid: 1})
        else:
            await admission.refresh(PRINCIPAL, rid)
        await assert_totals_match_leases(redis)
    # the end of the day: expire what is left, and one admission purges it (a handful: bounded)
    for subject in SUBJECTS:
        lk = contract.lease_key(subject, QUOTA)
        for member in await redis.zrange(lk, 0, -1):
            await redis.zadd(lk, {member: 1})
    assert (await admission.admit(PRINCIPAL, "last", 1, costs=(b"1", b"1"))).admitted
    await admission.settle(PRINCIPAL, "last", 1, 1, costs=(b"1", b"1"))
    await assert_totals_match_leases(redis)
    for subject in SUBJECTS:
        assert not await redis.exists(contract.lease_sum_key(subject, QUOTA))
        assert await redis.hlen(contract.lease_tokens_key(subject, QUOTA)) == 0
        assert await redis.hlen(contract.lease_cost_key(subject, QUOTA)) == 0


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(OPS)
def test_totals_equal_the_live_leases_and_return_to_zero(ops):
    asyncio.run(run(ops))


async def test_totals_of_leases_without_them_are_recounted(admission, fake_redis):
    """Leases written by a gateway without totals (a rolling upgrade): counted once, then kept."""
    p = make_principal(contract.Limits(tokens_per_day=1_000))
    await fake_redis.zadd(contract.lease_key(KEY), {"old": 10**15})
    await fake_redis.hset(contract.lease_tokens_key(KEY), "old", 700)
    await fake_redis.pexpire(contract.lease_key(KEY), 50_000)
    refused = await admission.admit(p, "new", 400)
    assert not refused.admitted  # 700 reserved by the old lease + 400 > 1,000
    assert await fake_redis.hgetall(contract.lease_sum_key(KEY)) == {b"n": b"1", b"tok": b"700", b"cost": b"0"}
    assert 0 < await fake_redis.pttl(contract.lease_sum_key(KEY)) <= 50_000  # expires with its leases
    assert (await admission.admit(p, "new", 300)).admitted
    assert await admission.settle(p, "new", 300, 300) == 1
    assert await fake_redis.hgetall(contract.lease_sum_key(KEY)) == {b"n": b"1", b"tok": b"700", b"cost": b"0"}


async def test_purge_is_bounded_per_call(admission, fake_redis):
    """A crashed gateway's thousand leases are purged a hundred per admission, the totals with them."""
    p = make_principal(contract.Limits(tokens_per_day=10**9))
    for i in range(1_000):
        assert (await admission.admit(p, f"r{i}", 5)).admitted
    lease = contract.lease_key(KEY)
    await fake_redis.zadd(lease, {f"r{i}".encode(): 1 for i in range(1_000)})
    assert (await admission.admit(p, "next", 5)).admitted
    assert await fake_redis.zcard(lease) == 1_000 - 100 + 1
    assert await fake_redis.hgetall(contract.lease_sum_key(KEY)) == {b"n": b"901", b"tok": b"4505", b"cost": b"0"}
    for i in range(9):
        await admission.admit(p, f"more{i}", 5)
    assert await fake_redis.zcard(lease) == 1 + 9
