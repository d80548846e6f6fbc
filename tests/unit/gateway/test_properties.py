"""Properties of the gateway's header and reservation arithmetic over extreme numbers (issue 27):
0, 1, the CRD's maxima, tiny and huge rates, month and year boundaries. Each test states what
must hold for every input Hypothesis tries. Only public functions are used."""

from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone
from fractions import Fraction

from hypothesis import example, given
from hypothesis import strategies as st

from atlas_core import contract
from atlas_gateway.http.errors import GatewayError
from atlas_gateway.ledger.admission import Calendar, Decision, format_duration, rate_limit_headers, rejection
from atlas_gateway.ledger.limits import COST_DAY, COST_MONTH, DAY, MONTH, REFUSALS, limit_args
from atlas_gateway.ledger.script_args import cost_args
from atlas_gateway.metering.bounds import Meter, utf8_len
from atlas_gateway.routes import route

from .conftest import make_principal

UTC = timezone.utc
CRD_MAX_TOKENS = 10**15  # the largest budget the CRDs admit (tokensPerMinute/Day/Month)
EXACT = 2**53  # admit.lua counts in doubles: integers beyond this are no longer exact
LATEST = datetime(9999, 11, 30, tzinfo=UTC).timestamp()  # the gateway's clock stays before this

any_ms = st.integers(min_value=-(2**63), max_value=2**63 - 1)  # what a script reply may carry


def seconds_of(duration: str) -> Fraction:
    """Read back an OpenAI-style duration: 250ms, 1.5s, 6m0s, 2h3m4s."""
    if duration.endswith("ms"):
        return Fraction(int(duration[:-2]), 1000)
    found = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+(?:\.\d+)?)s)?", duration)
    assert found and duration, duration
    hours, minutes, secs = found.groups()
    return int(hours or 0) * 3600 + int(minutes or 0) * 60 + Fraction(secs or "0")


# --------------------------------------------------------------------------- rate-limit headers


@given(any_ms)
@example(0)
@example(999)
@example(1000)
@example(59_999)
@example(60_000)
@example(3_600_000)
def test_reset_durations_never_understate_the_wait(ms):
    """A reset header is well-formed for any reply, and never says less time than ``ms``
    (rounding up only: to the millisecond below 1 s, the second above a minute)."""
    text = format_duration(ms)
    shown = seconds_of(text)
    assert shown >= Fraction(max(ms, 0), 1000)
    assert shown - Fraction(max(ms, 0), 1000) < 1  # and never a whole second more


limits_or_absent = st.integers(min_value=-1, max_value=CRD_MAX_TOKENS)


@given(
    limits_or_absent, st.integers(0, CRD_MAX_TOKENS), any_ms, limits_or_absent, st.integers(0, CRD_MAX_TOKENS), any_ms
)
def test_rate_limit_headers_are_present_for_each_limited_kind_and_plain_ascii(rl, rr, rs, tl, tr, ts):
    headers = dict(rate_limit_headers(rl, rr, rs, tl, tr, ts))
    for kind, limit, remaining in (("requests", rl, rr), ("tokens", tl, tr)):
        if limit < 0:  # no limit of this kind anywhere: no headers for it
            assert not any(kind.encode() in name for name in headers)
            continue
        assert headers[f"x-ratelimit-limit-{kind}".encode()] == str(limit).encode()
        assert headers[f"x-ratelimit-remaining-{kind}".encode()] == str(remaining).encode()
        assert headers[f"x-ratelimit-reset-{kind}".encode()].isascii()


# --------------------------------------------------------------------------- Retry-After


@given(
    reason=st.sampled_from(sorted(r for r in REFUSALS if r < 99)),
    retry_ms=st.integers(0, 2**63 - 1),
    subject=st.sampled_from([0, 1, 2]),
    reserve=st.integers(0, CRD_MAX_TOKENS),
)
def test_retry_after_is_a_whole_number_of_seconds_no_sooner_than_the_real_wait(reason, retry_ms, subject, reserve):
    principal = make_principal(contract.Limits(tokens_per_day=1), contract.Limits(tokens_per_day=1))
    decision = Decision([0, reason, subject, retry_ms, -1, -1, 0, -1, -1, 0, reserve, 0, 0])
    refused = rejection(decision, principal, reserve)
    headers = dict(refused.headers)
    retry_after = int(headers[b"retry-after"])
    assert refused.status == 429 and retry_after >= 1
    assert retry_after * 1000 >= retry_ms and (retry_after - 1) * 1000 < max(retry_ms, 1)
    budget = reason in (DAY, MONTH, COST_DAY, COST_MONTH)
    assert (headers.get(b"x-should-retry") == b"false") == budget
    assert (refused.type == "insufficient_quota") == budget


# --------------------------------------------------------------------------- calendar windows


def _near_boundaries() -> st.SearchStrategy[float]:
    """Instants within a few seconds of a UTC month start (year ends included)."""
    return st.builds(
        lambda year, month, offset: datetime(year, month, 1, tzinfo=UTC).timestamp() + offset,
        st.integers(1970, 9998),
        st.integers(1, 12),
        st.floats(-5, 5),
    ).filter(lambda t: t >= 0)


instants = st.one_of(st.floats(0, LATEST), _near_boundaries())


@given(instants)
@example(datetime(2026, 12, 31, 23, 59, 59, 999000, tzinfo=UTC).timestamp())
@example(datetime(2028, 2, 29, 12, tzinfo=UTC).timestamp())
@example(datetime(2027, 1, 1, tzinfo=UTC).timestamp())
def test_calendar_windows_contain_now_and_end_at_the_next_utc_boundary(now):
    cal = Calendar().refresh(now)
    moment = datetime.fromtimestamp(int(now), tz=UTC)
    assert (cal.day, cal.month) == (contract.day_of(moment), contract.month_of(moment))
    day_end = datetime.fromtimestamp(cal.day_end, tz=UTC)
    month_end = datetime.fromtimestamp(cal.month_end, tz=UTC)
    assert day_end == datetime(moment.year, moment.month, moment.day, tzinfo=UTC) + timedelta(days=1)
    assert (month_end.day, month_end.hour, month_end.minute) == (1, 0, 0)
    assert contract.month_of(month_end - timedelta(microseconds=1)) == cal.month  # the window's last instant
    assert 0 < cal.day_end - int(now) <= 86400 and 0 < cal.month_end - int(now) <= 31 * 86400
    assert cal.ms_until_day_end(now) >= 1000 and cal.ms_until_month_end(now) >= cal.ms_until_day_end(now)


# --------------------------------------------------------------------------- reservations


texts = st.text(max_size=40)
caps = st.one_of(st.none(), st.integers(0, 10**30))  # validation admits any integer >= 0
counts = st.one_of(st.none(), st.integers(1, 10**12))


@given(
    messages=st.lists(texts, min_size=1, max_size=5),
    max_tokens=caps,
    max_completion_tokens=caps,
    n=counts,
    best_of=counts,
    default_cap=st.integers(1, 10**6),
)
@example(messages=["hi"], max_tokens=10**20, max_completion_tokens=None, n=None, best_of=None, default_cap=16)
def test_a_chat_reservation_bounds_the_request_and_fits_the_admission_script(
    messages, max_tokens, max_completion_tokens, n, best_of, default_cap
):
    """reserve = prompt + cap x sequences, where the prompt bound counts every byte of text, the
    cap is the smallest positive cap field (else the default) and sequences max(n, best_of).
    A reservation the admission script cannot count exactly (2^53, far above the CRD's largest
    budget) is refused with a 400 naming the cap field, never sent to Redis."""
    doc = {"model": "m", "messages": [{"role": "user", "content": text} for text in messages]}
    for name, value in (
        ("max_tokens", max_tokens),
        ("max_completion_tokens", max_completion_tokens),
        ("n", n),
        ("best_of", best_of),
    ):
        if value is not None:
            doc[name] = value
    meter = Meter(default_cap=default_cap)
    positive = [v for v in (max_tokens, max_completion_tokens) if v]
    cap = min(positive) if positive else default_cap
    sequences = max(n or 1, best_of or 1)
    try:
        bound = meter.bound(route("chat"), doc)
    except GatewayError as refused:
        assert refused.status == 400 and refused.param in route("chat").cap_fields + ("n", "best_of")
        assert cap * sequences > CRD_MAX_TOKENS
        return
    assert (bound.cap, bound.sequences) == (cap, sequences)
    assert bound.prompt >= sum(utf8_len(text) for text in messages) + len(messages)
    assert bound.reserve == bound.prompt + cap * sequences < EXACT


@given(
    prompt=st.integers(0, CRD_MAX_TOKENS),
    completion=st.integers(0, CRD_MAX_TOKENS),
    cached=st.integers(0, CRD_MAX_TOKENS),
    prices=st.lists(st.integers(0, 10**12), min_size=3, max_size=3),
)
def test_cost_arguments_are_integer_micro_units_never_below_the_exact_cost(prompt, completion, cached, prices):
    price = contract.Price("*", *prices)
    key, quota = cost_args((price, None), prompt, completion, cached)
    assert quota == b"0"
    cached = min(cached, prompt)
    exact = Fraction((prompt - cached) * prices[0] + cached * prices[1] + completion * prices[2], contract.MICRO)
    assert exact <= int(key) < exact + 1


@given(
    rps=st.floats(min_value=5e-324, max_value=1e6, exclude_min=False),
    tokens=st.integers(1, CRD_MAX_TOKENS),
    cost=st.floats(min_value=1e-6, max_value=1e9),
)
def test_limits_reach_the_script_as_the_numbers_they_are(rps, tokens, cost):
    """Every limit argument reads back (Lua's tonumber, like Python's float) as the limit itself."""
    limits = contract.Limits(requests_per_second=rps, tokens_per_day=tokens, cost_per_day=cost)
    args = limit_args(limits, contract.Shortfall())
    assert float(args[0]) == rps and int(args[3]) == tokens
    assert int(args[8]) == contract.to_micro(cost) >= cost * contract.MICRO - 1
