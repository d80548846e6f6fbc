"""Budget forecasts: burn rate from a short counter history, and when a budget runs out.

Pure functions only (the history's Redis persistence is in history.py). A subject's history is
a list of samples of its month counter (``tokensThisMonth``); each sample also carries a running
``total`` that never goes down, so the tokens burnt between two samples is one subtraction even
across a month boundary (where the raw counter restarts at 0).

The burn rate is the faster of two windows (design.md, "Cost budgets, forecasts, rotation"):

* recent: from the oldest sample that is at most ``RECENT`` old (but at least ``MIN_HISTORY``
  old) to now — follows a burst within minutes;
* long: from the oldest sample kept (up to ``RETENTION``) to now — keeps a bursty subject that
  pauses between bursts from looking idle.

The faster one wins, so a forecast errs towards warning early. With less than ``MIN_HISTORY``
of history, or nothing burnt over it (a quiet subject), there is no forecast at all.
"""

from __future__ import annotations

import bisect
import functools
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, Iterable

from atlas_core.contract import INT64_MAX, HistorySample, Limits

from . import times

MIN_HISTORY = 60.0  # seconds: never forecast from less
RECENT = 300.0  # seconds: the recent window
RETENTION = 3600.0  # seconds: the long window (oldest sample kept)
SPACING = 60.0  # seconds between stored samples of one subject
FINE = RECENT + 2 * SPACING  # samples this recent are all kept in memory
COARSE = 600.0  # older ones one per this many seconds

# "Meaningful" forecast change: only these trigger a status patch of their own.
RATE_CHANGE = 0.10  # relative change of tokensPerHour, while a budget is at risk
RATE_CHANGE_SAFE = 0.25  # ...and while none is (a key going quiet decays in fewer patches)
EXHAUSTS_SHIFT = 0.10  # relative shift of the time left until exhaustsAt
EXHAUSTS_SHIFT_MIN = 60.0  # ...but never less than this many seconds

DAY_BUDGET, MONTH_BUDGET = "tokensPerDay", "tokensPerMonth"


# --------------------------------------------------------------------------- history


def advance(samples: list[HistorySample], at_ms: int, month: str, settled: int) -> HistorySample:
    """The sample a reading at ``at_ms`` makes, continuing ``samples``' running total.

    A new month (or a counter that went down, e.g. Redis lost it) restarts the raw counter: the
    tokens since then are the new raw value, as Prometheus treats a counter reset.
    """
    if not samples:
        return HistorySample(at_ms, month, settled, 0)
    last = samples[-1]
    burnt = settled - last.settled if month == last.month and settled >= last.settled else settled
    return HistorySample(at_ms, month, settled, last.total + burnt)


def should_store(samples: list[HistorySample], reading: HistorySample) -> bool:
    """Keep a reading as a sample: the first one, then on a change at most every SPACING.

    A quiet subject stores nothing after its first sample: its flat counter is already fully
    described by the last sample (the value holds until the next change).
    """
    if not samples:
        return True
    last = samples[-1]
    changed = reading.total != last.total or reading.month != last.month
    return changed and reading.at_ms - last.at_ms >= SPACING * 1000


def trim(samples: list[HistorySample], now_ms: int) -> None:
    """Drop samples older than RETENTION, keeping the newest of those as the window's start."""
    horizon = now_ms - RETENTION * 1000
    drop = 0
    while drop + 1 < len(samples) and samples[drop + 1].at_ms <= horizon:
        drop += 1
    if drop:
        del samples[:drop]


def thin(samples: list[HistorySample], now_ms: int) -> None:
    """Keep every sample of the last FINE seconds (where the recent window starts), but older
    ones only COARSE apart (the long window needs just its start): ~15 samples per subject."""
    fine_from = now_ms - FINE * 1000
    kept: list[HistorySample] = []
    for i, sample in enumerate(samples):
        if (
            not kept
            or sample.at_ms >= fine_from
            or i == len(samples) - 1
            or sample.at_ms - kept[-1].at_ms >= COARSE * 1000
        ):
            kept.append(sample)
    if len(kept) != len(samples):
        samples[:] = kept


@dataclass(frozen=True)
class BurnRate:
    tokens_per_second: float
    window_seconds: float  # the window the rate was measured over

    @property
    def tokens_per_hour(self) -> int:
        """Rounded, and at most what the status's int64 holds (counters that jumped by 2^63)."""
        per_hour = self.tokens_per_second * 3600
        return INT64_MAX if per_hour >= INT64_MAX else int(round(per_hour))

    @property
    def basis(self) -> str:
        return f"last {_duration(self.window_seconds)}"


def burn_rate(samples: list[HistorySample], now: HistorySample) -> BurnRate | None:
    """The faster of the recent and the long window, or None (too little history, or quiet)."""
    if not samples:
        return None
    oldest = samples[0]
    span = (now.at_ms - oldest.at_ms) / 1000
    if span < MIN_HISTORY:
        return None
    best = BurnRate((now.total - oldest.total) / span, span)
    start = _recent_start(samples, now.at_ms)
    if start is not None and start is not oldest:
        window = (now.at_ms - start.at_ms) / 1000
        recent = BurnRate((now.total - start.total) / window, window)
        if recent.tokens_per_second > best.tokens_per_second:
            best = recent
    if not best.tokens_per_second > 0:
        return None  # quiet: nothing burnt over the whole history
    return best


def _recent_start(samples: list[HistorySample], now_ms: int) -> HistorySample | None:
    """The oldest sample inside [now - RECENT, now - MIN_HISTORY]; else the newest before it."""
    first_inside = bisect.bisect_left(samples, now_ms - RECENT * 1000, key=lambda s: s.at_ms)
    if first_inside < len(samples) and samples[first_inside].at_ms <= now_ms - MIN_HISTORY * 1000:
        return samples[first_inside]
    return samples[first_inside - 1] if first_inside > 0 else None


# --------------------------------------------------------------------------- budgets


@dataclass(frozen=True)
class Budget:
    """One budget a burn rate eats into. Cost budgets (costPerDay/Month) fit the same shape."""

    name: str  # the limit's field name: tokensPerDay, tokensPerMonth
    limit: int
    used: int
    resets_at: datetime


@functools.lru_cache(maxsize=8)  # one cycle asks once per subject with the same ``now``
def next_day(now: datetime) -> datetime:
    day = now.astimezone(timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0)
    return day + timedelta(days=1)


@functools.lru_cache(maxsize=8)
def next_month(now: datetime) -> datetime:
    now = now.astimezone(timezone.utc)
    year, month = (now.year + 1, 1) if now.month == 12 else (now.year, now.month + 1)
    return datetime(year, month, 1, tzinfo=timezone.utc)


def token_budgets(limits: Limits, tokens_today: int, tokens_this_month: int, now: datetime) -> list[Budget]:
    out = []
    if limits.tokens_per_day is not None:
        out.append(Budget(DAY_BUDGET, limits.tokens_per_day, tokens_today, next_day(now)))
    if limits.tokens_per_month is not None:
        out.append(Budget(MONTH_BUDGET, limits.tokens_per_month, tokens_this_month, next_month(now)))
    return out


@dataclass(frozen=True)
class Exhaustion:
    budget: Budget
    at: datetime


@dataclass(frozen=True)
class Forecast:
    rate: BurnRate
    exhaustions: tuple[Exhaustion, ...]  # every budget that runs out before it resets, soonest first

    @property
    def first(self) -> Exhaustion | None:
        return self.exhaustions[0] if self.exhaustions else None

    def to_status(self) -> dict[str, Any]:
        out: dict[str, Any] = {"tokensPerHour": self.rate.tokens_per_hour, "basis": self.rate.basis}
        if self.first is not None:
            out["exhaustsAt"] = times.rfc3339(self.first.at)
        return out


def forecast(rate: BurnRate | None, budgets: Iterable[Budget], now: datetime) -> Forecast | None:
    """When each budget runs out at ``rate``, keeping those that run out before they reset.

    Decided on seconds first: a datetime is built only for a budget that runs out before its
    reset (so within a month of ``now``), never from the time left itself, which a tiny rate
    against a large budget puts past year 9999.
    """
    if rate is None:
        return None
    found = []
    for budget in budgets:
        left = budget.limit - budget.used
        seconds = 0.0 if left <= 0 else left / rate.tokens_per_second
        if seconds < (budget.resets_at - now).total_seconds():
            found.append(Exhaustion(budget, now + timedelta(seconds=seconds)))
    found.sort(key=lambda e: e.at)
    return Forecast(rate, tuple(found))


def changed_meaningfully(old: dict[str, Any] | None, new: dict[str, Any] | None, now: datetime) -> bool:
    """Whether ``status.forecast`` should be rewritten (small jitter is not worth a patch).
    A shown ``exhaustsAt`` that does not parse (edited by hand) is rewritten."""
    if old is None or new is None:
        return (old is None) != (new is None)
    old_at, new_at = old.get("exhaustsAt"), new.get("exhaustsAt")
    before, after = old.get("tokensPerHour") or 0, new.get("tokensPerHour") or 0
    threshold = RATE_CHANGE if old_at or new_at else RATE_CHANGE_SAFE
    if abs(after - before) > threshold * max(before, 1):
        return True
    if (old_at is None) != (new_at is None):
        return True
    if old_at is None or new_at is None:  # (both, after the check above)
        return False
    try:
        old_t, new_t = times.parse_rfc3339(old_at), times.parse_rfc3339(new_at)
    except ValueError:
        return True
    left = max((old_t - now).total_seconds(), 0.0)
    return abs((new_t - old_t).total_seconds()) > max(EXHAUSTS_SHIFT_MIN, EXHAUSTS_SHIFT * left)


def seconds_left(exhaustion: Exhaustion, now: datetime) -> float:
    return max(0.0, (exhaustion.at - now).total_seconds())


# --------------------------------------------------------------------------- formatting


def _duration(seconds: float) -> str:
    minutes = int(seconds // 60)
    if minutes >= 60 and minutes % 60 == 0:
        return f"{minutes // 60}h"
    if minutes >= 60:
        return f"{minutes // 60}h{minutes % 60}m"
    return f"{max(minutes, 1)}m"
