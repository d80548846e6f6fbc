"""admit.lua / settle.lua maths on fakeredis: every limit kind, on the key and on its quota."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

from atlas_core import contract
from atlas_gateway.ledger import admission as adm
from atlas_gateway.ledger import limits
from atlas_gateway.ledger.script_args import key_calls

from .conftest import make_principal

KEY = contract.key_subject("team", "app")
QUOTA = contract.quota_subject("team", "shared")


async def snapshot(redis) -> dict:
    """Every key with its full content: proves that a rejection wrote nothing."""
    out = {}
    for key in sorted(await redis.keys("*")):
        kind = (await redis.type(key)).decode()
        if kind == "hash":
            out[key] = await redis.hgetall(key)
        elif kind == "zset":
            out[key] = await redis.zrange(key, 0, -1, withscores=True)
        else:
            out[key] = await redis.get(key)
    return out


def header(decision, name: str) -> str | None:
    for k, v in decision.headers:
        if k == name.encode():
            return v.decode()
    return None


async def test_request_bucket_allows_burst_then_rejects_with_real_wait(admission):
    p = make_principal(contract.Limits(requests_per_second=2, burst=3))
    results = [await admission.admit(p, f"r{i}", 10) for i in range(4)]
    assert [d.admitted for d in results] == [True, True, True, False]
    refused = results[3]
    assert refused.reason == limits.REQUESTS and refused.subject == 1
    assert 0 < refused.retry_ms <= 500  # one request refills in 1/2 s
    assert header(results[0], "x-ratelimit-limit-requests") == "3"
    assert header(results[0], "x-ratelimit-remaining-requests") == "2"
    assert header(results[2], "x-ratelimit-remaining-requests") == "0"
    assert header(results[0], "x-ratelimit-limit-tokens") is None  # no token limit anywhere


async def test_rejection_consumes_nothing(admission, fake_redis):
    p = make_principal(contract.Limits(requests_per_second=1, burst=1, tokens_per_day=1000, max_concurrent=5))
    assert (await admission.admit(p, "first", 10)).admitted
    before = await snapshot(fake_redis)
    refused = await admission.admit(p, "second", 10)
    assert not refused.admitted and refused.reason == limits.REQUESTS
    assert await snapshot(fake_redis) == before


async def test_concurrency_lease_released_by_settle(admission, fake_redis):
    p = make_principal(contract.Limits(max_concurrent=2))
    assert (await admission.admit(p, "a", 5)).admitted
    assert (await admission.admit(p, "b", 5)).admitted
    refused = await admission.admit(p, "c", 5)
    assert not refused.admitted and refused.reason == limits.CONCURRENCY
    assert header(refused, "x-ratelimit-remaining-requests") == "0"
    assert await admission.settle(p, "a", 5, 3) == 1
    assert (await admission.admit(p, "c", 5)).admitted
    assert await fake_redis.zcard(contract.lease_key(KEY)) == 2


async def test_tokens_per_minute_reserve_refund_and_overrun(admission, fake_redis):
    p = make_principal(contract.Limits(tokens_per_minute=1000))
    first = await admission.admit(p, "a", 400)
    assert first.admitted
    assert header(first, "x-ratelimit-limit-tokens") == "1000"
    assert int(header(first, "x-ratelimit-remaining-tokens")) in (600, 601)
    assert (await admission.admit(p, "b", 400)).admitted
    refused = await admission.admit(p, "c", 400)
    assert not refused.admitted and refused.reason == limits.TOKENS
    assert 11_000 <= refused.retry_ms <= 12_000  # 200 missing tokens at 1000/min
    await admission.settle(p, "a", 400, 100)  # 300 refunded
    level = float((await fake_redis.hget(contract.token_bucket_key(KEY), "tokens")))
    assert 500 <= level <= 510
    assert (await admission.admit(p, "c", 400)).admitted
    await admission.settle(p, "b", 400, 900)  # real usage beyond the reservation is charged
    level = float((await fake_redis.hget(contract.token_bucket_key(KEY), "tokens")))
    assert level < 0


async def test_request_larger_than_tokens_per_minute_never_fits(admission):
    p = make_principal(contract.Limits(tokens_per_minute=100))
    refused = await admission.admit(p, "a", 101)
    assert not refused.admitted and refused.reason == limits.TOO_LARGE


async def test_daily_budget_counts_settled_plus_live_reservations(admission, fake_redis):
    p = make_principal(contract.Limits(tokens_per_day=1000))
    assert (await admission.admit(p, "a", 400)).admitted
    assert (await admission.admit(p, "b", 400)).admitted
    refused = await admission.admit(p, "c", 400)
    assert not refused.admitted and refused.reason == limits.DAY
    assert refused.retry_ms >= 1000  # until 00:00 UTC
    await admission.settle(p, "a", 400, 100)
    assert (await admission.admit(p, "c", 400)).admitted  # 100 settled + 400 live + 400 <= 1000
    day_key, month_key = contract.usage_keys(KEY, datetime.now(timezone.utc))
    assert await fake_redis.hget(day_key, "settled") == b"100"
    assert await fake_redis.hget(month_key, "settled") == b"100"
    assert await fake_redis.hget(day_key, "requests") == b"3"  # counted at admission only
    assert await fake_redis.hget(day_key, "last") is not None


async def test_monthly_budget_on_the_quota_is_shared_by_its_keys(admission):
    quota = contract.Limits(tokens_per_month=500)
    app = make_principal(contract.Limits(), quota, name="app")
    other = make_principal(contract.Limits(), quota, name="other")
    assert (await admission.admit(app, "a", 300)).admitted
    refused = await admission.admit(other, "b", 300)
    assert not refused.admitted and refused.reason == limits.MONTH and refused.subject == 2
    err = adm.rejection(refused, other, 300)
    assert err.status == 429 and err.type == "insufficient_quota"
    assert (b"x-should-retry", b"false") in err.headers
    assert "AtlasQuota team/shared" in err.message


async def test_quota_concurrency_and_key_limits_both_apply(admission):
    p = make_principal(contract.Limits(max_concurrent=5), contract.Limits(max_concurrent=1))
    assert (await admission.admit(p, "a", 1)).admitted
    refused = await admission.admit(p, "b", 1)
    assert refused.reason == limits.CONCURRENCY and refused.subject == 2


async def test_expired_leases_are_purged_inside_the_script(admission, fake_redis):
    p = make_principal(contract.Limits(max_concurrent=1, tokens_per_day=100))
    assert (await admission.admit(p, "crashed", 80)).admitted
    assert not (await admission.admit(p, "next", 80)).admitted
    # the gateway that held "crashed" died: its lease expiry passes
    await fake_redis.zadd(contract.lease_key(KEY), {"crashed": 1})
    assert (await admission.admit(p, "next", 80)).admitted
    assert await fake_redis.hget(contract.lease_tokens_key(KEY), "crashed") is None
    assert await fake_redis.zrange(contract.lease_key(KEY), 0, -1) == [b"next"]


async def test_settle_drops_lease_and_token_reservation(admission, fake_redis):
    p = make_principal(contract.Limits(tokens_per_day=1000), contract.Limits(tokens_per_month=5000))
    assert (await admission.admit(p, "a", 300)).admitted
    assert await fake_redis.hget(contract.lease_tokens_key(QUOTA), "a") == b"300"
    assert await admission.settle(p, "a", 300, 120) == 2
    for subject in (KEY, QUOTA):
        assert await fake_redis.zcard(contract.lease_key(subject, QUOTA)) == 0
        assert await fake_redis.hlen(contract.lease_tokens_key(subject, QUOTA)) == 0
    usages = await contract.read_usages(fake_redis, [KEY, QUOTA], datetime.now(timezone.utc), {KEY: QUOTA})
    assert usages[KEY].tokens_today == 120 and usages[QUOTA].tokens_this_month == 120
    assert usages[KEY].requests_today == 1


async def test_unlimited_key_is_admitted_without_headers(admission):
    d = await admission.admit(make_principal(contract.Limits()), "a", 10)
    assert d.admitted and d.headers == []


@pytest.mark.parametrize(
    "ms,text", [(0, "0ms"), (250, "250ms"), (1500, "1.5s"), (60_000, "1m0s"), (3_723_000, "1h2m3s")]
)
def test_format_duration(ms, text):
    assert adm.format_duration(ms) == text


def test_calendar_month_end_rolls_over_the_year():
    cal = adm.Calendar().refresh(datetime(2026, 12, 31, 23, 59, 0, tzinfo=timezone.utc).timestamp())
    assert cal.day == "2026-12-31" and cal.month == "2026-12"
    assert cal.month_end == datetime(2027, 1, 1, tzinfo=timezone.utc).timestamp()
    assert cal.day_end == cal.month_end


async def test_ticket_settles_exactly_once(admission, fake_redis):
    from atlas_gateway.ledger.recovery import Recovery
    from atlas_gateway.ledger.ticket import Ticket

    recovery = Recovery(admission)  # no Sentinel: settlements are not kept for replay
    p = make_principal(contract.Limits(tokens_per_day=1000))
    assert (await admission.admit(p, "a", 100)).admitted
    ticket = Ticket(admission, recovery, p, "a", 100)
    await ticket.settle(40)
    await ticket.settle(40)
    day_key, _ = contract.usage_keys(KEY, datetime.now(timezone.utc))
    assert await fake_redis.hget(day_key, "settled") == b"40"


async def test_every_counter_key_gets_a_ttl(admission, fake_redis):
    p = make_principal(
        contract.Limits(requests_per_second=5, tokens_per_minute=1000, tokens_per_day=10_000, max_concurrent=3),
        contract.Limits(tokens_per_month=100_000),
    )
    for rid in ("a", "b"):
        assert (await admission.admit(p, rid, 100)).admitted
        await admission.settle(p, rid, 100, 40)
    assert (await admission.admit(p, "c", 100)).admitted  # leave one lease in flight
    keys = await fake_redis.keys("*")
    assert len(keys) >= 10
    for key in keys:
        assert await fake_redis.ttl(key) > 0, key
    day_key, month_key = contract.usage_keys(KEY, datetime.now(timezone.utc), QUOTA)
    assert await fake_redis.ttl(day_key) > 2 * 86400
    assert await fake_redis.ttl(month_key) > 30 * 86400


async def test_refresh_pushes_a_live_lease_forward_and_never_resurrects_one(fake_redis):
    # admitted with a 1 s lease, refreshed by a runner whose TTL is 10 min: the expiry moves
    # (both subjects), the reservation stays, the purge of admit.lua no longer frees the slot
    short = adm.Admission(fake_redis, lease_ttl_seconds=1)
    long = adm.Admission(fake_redis, lease_ttl_seconds=600)
    p = make_principal(contract.Limits(max_concurrent=1), contract.Limits(tokens_per_day=1000))
    assert (await short.admit(p, "stream", 100)).admitted
    before = await fake_redis.zscore(contract.lease_key(KEY, QUOTA), "stream")
    assert await long.refresh(p, "stream") == 2
    after = await fake_redis.zscore(contract.lease_key(KEY, QUOTA), "stream")
    assert after - before >= 599_000
    assert await fake_redis.zscore(contract.lease_key(QUOTA), "stream") >= after
    assert await fake_redis.hget(contract.lease_tokens_key(QUOTA), "stream") == b"100"
    assert await fake_redis.pttl(contract.lease_key(KEY, QUOTA)) > 600_000
    # settled: a late refresh must not bring the lease back
    await short.settle(p, "stream", 100, 10)
    assert await long.refresh(p, "stream") == 0
    assert await fake_redis.zcard(contract.lease_key(KEY, QUOTA)) == 0
    assert await fake_redis.hlen(contract.lease_tokens_key(QUOTA)) == 0


async def test_refresh_is_a_no_op_for_keys_without_leases(admission, fake_redis):
    p = make_principal(contract.Limits(requests_per_second=5))
    assert not key_calls(p).leased
    assert (await admission.admit(p, "a", 1)).admitted
    assert await admission.refresh(p, "a") == 0


# ------------------------------------------------------------------ onBudgetShortfall: Shrink

SHRINK = contract.Shortfall("Shrink", 16)


async def test_shrink_lowers_the_cap_to_what_the_day_budget_holds(admission):
    p = make_principal(contract.Limits(tokens_per_day=1000), shortfall=SHRINK)
    assert (await admission.admit(p, "a", 700, 100, 1)).reserved == 700
    # 300 left: prompt 100 + cap 500 does not fit; 100 + 200 does
    decision = await admission.admit(p, "b", 600, 100, 1)
    assert decision.admitted and decision.reserved == 300
    assert header(decision, "x-ratelimit-remaining-tokens") == "0"


async def test_shrink_divides_what_is_left_between_the_sequences(admission):
    p = make_principal(contract.Limits(tokens_per_day=1000), shortfall=SHRINK)
    decision = await admission.admit(p, "a", 100 + 4 * 500, 100, 4)  # 900 left for 4 sequences
    assert decision.admitted and decision.reserved == 100 + 4 * 225


async def test_shrink_refuses_below_min_completion_tokens(admission, fake_redis):
    p = make_principal(contract.Limits(tokens_per_day=1000), shortfall=contract.Shortfall("Shrink", 50))
    assert (await admission.admit(p, "a", 900, 0, 0)).admitted  # embeddings-like: no shrink
    before = await snapshot(fake_redis)
    refused = await admission.admit(p, "b", 200, 60, 1)  # 100 left: 60 + 40 < 60 + 50
    assert not refused.admitted and refused.reason == limits.DAY
    assert await snapshot(fake_redis) == before


async def test_request_smaller_than_min_completion_may_shrink_to_its_own_cap_only(admission):
    p = make_principal(contract.Limits(tokens_per_day=100), shortfall=contract.Shortfall("Shrink", 50))
    refused = await admission.admit(p, "a", 80 + 30, 80, 1)  # fits 20 of its 30: below its own cap
    assert not refused.admitted


async def test_reject_policy_never_shrinks(admission):
    p = make_principal(contract.Limits(tokens_per_day=1000))
    assert (await admission.admit(p, "a", 900, 100, 1)).admitted
    refused = await admission.admit(p, "b", 200, 50, 1)
    assert not refused.admitted and refused.reason == limits.DAY


async def test_shrink_on_the_quota_and_the_lowest_fit_wins(admission):
    p = make_principal(
        contract.Limits(tokens_per_day=10_000, tokens_per_month=600),
        contract.Limits(tokens_per_day=400),
        shortfall=SHRINK,
        quota_shortfall=SHRINK,
    )
    decision = await admission.admit(p, "a", 100 + 1000, 100, 1)
    assert decision.admitted and decision.reserved == 400  # the quota's day budget is the lowest


async def test_a_reject_subject_still_refuses_what_a_shrink_subject_would_shrink(admission):
    p = make_principal(
        contract.Limits(tokens_per_day=300), contract.Limits(tokens_per_day=10_000), quota_shortfall=SHRINK
    )
    refused = await admission.admit(p, "a", 100 + 1000, 100, 1)
    assert not refused.admitted and refused.reason == limits.DAY and refused.subject == 1


async def test_the_shrunk_reservation_is_what_tokens_per_minute_sees(admission):
    p = make_principal(contract.Limits(tokens_per_day=500, tokens_per_minute=450), shortfall=SHRINK)
    decision = await admission.admit(p, "a", 100 + 1000, 100, 1)  # 1100 > tpm, but shrunk to 500
    assert not decision.admitted and decision.reason == limits.TOO_LARGE  # 500 > 450 still
    p = make_principal(contract.Limits(tokens_per_day=400, tokens_per_minute=450), shortfall=SHRINK, name="b")
    assert (await admission.admit(p, "b", 100 + 1000, 100, 1)).reserved == 400


# ----------------------------------------------------------------------- undo.lua (issue 10)


async def test_undo_of_an_admission_that_ran_leaves_nothing(admission, fake_redis):
    """The admission ran (its reply was lost): undo drops lease and reservation on every
    subject, takes back the request count and the tokens-per-minute reservation."""
    p = make_principal(
        contract.Limits(max_concurrent=1, tokens_per_minute=1_000), contract.Limits(tokens_per_day=10_000)
    )
    assert (await admission.admit(p, "lost", 300)).admitted
    assert await admission.undo(p, "lost", 300, 0, admission=True) == 2
    for subject in (KEY, QUOTA):
        assert await fake_redis.zcard(contract.lease_key(subject, QUOTA)) == 0
        assert await fake_redis.hlen(contract.lease_tokens_key(subject, QUOTA)) == 0
        day_key, _ = contract.usage_keys(subject, datetime.now(timezone.utc), QUOTA)
        assert await fake_redis.hget(day_key, "requests") == b"0"
        assert await fake_redis.hget(day_key, "settled") is None
    again = await admission.admit(p, "next", 1_000)  # the whole minute bucket is back
    assert again.admitted, again.reason
    assert header(again, "x-ratelimit-remaining-tokens") == "0"


async def test_undo_before_a_late_admission_makes_it_lease_nothing(admission, fake_redis):
    """Redis ran the undo first and the stalled admission afterwards: it is refused (99)."""
    p = make_principal(contract.Limits(max_concurrent=1, tokens_per_day=10_000))
    assert await admission.undo(p, "late", 100, 0, admission=True) == 0
    before = await snapshot(fake_redis)
    late = await admission.admit(p, "late", 100)
    assert not late.admitted and late.reason == limits.UNDONE
    assert await snapshot(fake_redis) == before
    assert (await admission.admit(p, "other", 100)).admitted  # the slot is free


async def test_undo_of_a_settlement_bills_once_however_often_retried(admission, fake_redis):
    p = make_principal(contract.Limits(tokens_per_day=10_000))
    assert (await admission.admit(p, "s", 100)).admitted
    for _ in range(3):  # retried: only the first finds the lease
        await admission.undo(p, "s", 100, 40, admission=False)
    day_key, month_key = contract.usage_keys(KEY, datetime.now(timezone.utc))
    assert await fake_redis.hget(day_key, "settled") == b"40"
    assert await fake_redis.hget(month_key, "settled") == b"40"
    assert await fake_redis.hget(day_key, "requests") == b"1"
    # and when the settlement had in fact run before its reply was lost
    assert (await admission.admit(p, "t", 100)).admitted
    await admission.settle(p, "t", 100, 10)
    assert await admission.undo(p, "t", 100, 10, admission=False) == 0
    assert await fake_redis.hget(day_key, "settled") == b"50"


async def test_tombstones_expire(fake_redis):
    short = adm.Admission(fake_redis, lease_ttl_seconds=0.05)
    p = make_principal(contract.Limits(max_concurrent=1))
    await short.undo(p, "a", 1, 0, admission=True)
    assert await fake_redis.pttl(contract.undone_key(KEY)) > 0
    assert await fake_redis.zcard(contract.undone_key(KEY)) == 1
