"""Properties of the contract's numbers (issue 27): cost in integer micro-units, and what the
operator and the gateway read back from Redis, whatever it holds. Each test states what must
hold for every input Hypothesis tries."""

from __future__ import annotations

from datetime import datetime, timezone
from decimal import Decimal
from fractions import Fraction

from hypothesis import example, given
from hypothesis import strategies as st

from atlas_core import contract
from atlas_core.contract import INT64_MAX, INT64_MIN, HistorySample, PreviousKey, Price

NOW = datetime(2026, 11, 27, 12, tzinfo=timezone.utc)
CRD_MAX_PRICE = 10**6  # currency per million tokens (AtlasPriceList)
CRD_MAX_COST = 10**9  # costPerDay / costPerMonth
tokens = st.integers(0, 10**15)
amounts = st.decimals(min_value=0, max_value=CRD_MAX_COST, allow_nan=False, allow_infinity=False, places=9)


# --------------------------------------------------------------------------- cost


@given(amounts)
@example(Decimal("0.0000001"))
@example(Decimal(CRD_MAX_COST))
def test_an_amount_in_micro_units_is_rounded_up_never_down(amount):
    micro = contract.to_micro(amount)
    assert isinstance(micro, int) and amount * contract.MICRO <= micro < amount * contract.MICRO + 1


@given(st.integers(INT64_MIN, INT64_MAX))
def test_micro_units_shown_as_a_decimal_read_back_exactly(micro):
    """status.usage.costToday: no float drift, ever (and 0 is "0")."""
    text = contract.format_micro(micro)
    assert Decimal(text) * contract.MICRO == micro and contract.to_micro(text) == micro
    assert text == "0" if micro == 0 else not text.endswith("0") or "." not in text


@given(
    prompt=tokens,
    completion=tokens,
    cached=tokens,
    prices=st.lists(st.integers(0, CRD_MAX_PRICE * contract.MICRO), min_size=3, max_size=3),
)
def test_a_requests_cost_is_the_exact_cost_rounded_up_and_grows_with_its_tokens(prompt, completion, cached, prices):
    price = Price("*", *prices)
    cost = price.cost(prompt, completion, cached)
    read = min(cached, prompt)
    exact = Fraction((prompt - read) * prices[0] + read * prices[1] + completion * prices[2], contract.MICRO)
    assert isinstance(cost, int) and exact <= cost < exact + 1
    assert price.cost(prompt + 1, completion, cached) >= cost <= price.cost(prompt, completion + 1, cached)
    assert price.cost(0, 0, 0) == 0


@given(
    st.decimals(min_value=0, max_value=CRD_MAX_PRICE, places=6),
    st.decimals(min_value=0, max_value=CRD_MAX_PRICE, places=6),
    tokens,
)
def test_a_price_list_entry_never_undercharges(input_price, output_price, n):
    """From the CRD's decimal prices per million tokens to micro-units per token x 10^6."""
    price = Price.from_spec("*", {"input": str(input_price), "output": str(output_price)})
    assert price.cost(n, n) >= (input_price + output_price) * n  # in micro-units: price/10^6 x 10^6


# --------------------------------------------------------------------------- read back from Redis


redis_values = st.one_of(
    st.none(),
    st.integers(-(2**70), 2**70).map(str),
    st.floats().map(repr),
    st.text(max_size=12),
    st.sampled_from(["inf", "-inf", "nan", "NaN", "1e400", "12.0", " 7 ", "0x10", ""]),
)


@given(settled=redis_values, requests=redis_values, last=redis_values, cost=redis_values, month=redis_values)
def test_usage_counters_parse_into_int64_figures_or_a_clear_value_error(settled, requests, last, cost, month):
    """Whatever a usage hash holds: a Usage whose figures a status can show (int64, a real time),
    or ValueError, the one error the readers isolate per subject. Never OverflowError."""
    day_hash = {
        k: v.encode()
        for k, v in (("settled", settled), ("requests", requests), ("last", last), ("cost", cost))
        if v is not None
    }
    month_hash = {b"settled": month.encode()} if month is not None else {}
    try:
        usage = contract.parse_usage(day_hash, month_hash, NOW)
    except ValueError:
        return
    for figure in (usage.tokens_today, usage.tokens_this_month, usage.requests_today, usage.cost_today or 0):
        assert INT64_MIN <= figure <= INT64_MAX
    usage.to_status(priced=True)


@given(
    st.text(max_size=80)
    | st.lists(
        st.tuples(
            st.integers(-(2**70), 2**70),
            st.text(max_size=8),
            st.integers(-(2**70), 2**70),
            st.integers(-(2**70), 2**70),
        ),
        max_size=5,
    ).map(lambda xs: ",".join(" ".join(map(str, x)) for x in xs))
)
def test_a_damaged_history_loses_only_its_damaged_samples(raw):
    samples = contract.decode_history(raw)
    assert [s.at_ms for s in samples] == sorted(s.at_ms for s in samples)
    for sample in samples:
        assert 0 <= sample.at_ms <= contract.MAX_UNIX_SECONDS * 1000
        assert INT64_MIN <= sample.settled <= INT64_MAX and INT64_MIN <= sample.total <= INT64_MAX
        assert HistorySample.decode(sample.encode()) == sample


@given(
    st.text(max_size=30)
    | st.builds(lambda h, t: f"{h} {t}", st.text("0123456789abcdef", max_size=8), st.floats().map(repr))
)
def test_a_previous_key_deadline_is_a_time_redis_and_a_datetime_can_hold(raw):
    try:
        previous = PreviousKey.decode(raw)
    except ValueError:
        return
    assert 0 <= previous.until <= contract.MAX_UNIX_SECONDS
    datetime.fromtimestamp(previous.until, tz=timezone.utc)
