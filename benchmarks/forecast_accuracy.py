"""Synthetic traffic through the forecast, for its tests and for the accuracy figures in
docs/operator.md: ``python -m benchmarks.forecast_accuracy``.

A subject with a daily budget is read every ``cycle`` seconds, as the write-back loop reads it;
its counter follows a traffic pattern (tokens settled per request, discrete as in reality).
The forecast's rate and exhaustsAt are compared with the pattern's true average rate and the
moment the budget really runs out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Callable

from atlas_core.contract import Limits, month_of
from atlas_operator import forecast as fc
from atlas_operator.history import History

START = datetime(2026, 11, 27, 0, 0, tzinfo=timezone.utc)


def steady(tokens_per_hour: float, request_tokens: int = 137) -> Callable[[float], int]:
    """Requests of ``request_tokens`` at a constant pace."""
    every = request_tokens * 3600 / tokens_per_hour
    return lambda t: int(t // every) * request_tokens


def bursty(
    tokens_per_hour: float, period: float = 600, duty: float = 0.2, request_tokens: int = 137
) -> Callable[[float], int]:
    """Bursts of ``duty * period`` seconds every ``period`` seconds, averaging tokens_per_hour."""
    burst_rate = tokens_per_hour / 3600 / duty  # tokens/s while bursting

    def total(t: float) -> int:
        whole, part = divmod(t, period)
        busy = whole * period * duty + min(part, period * duty)
        return int(busy * burst_rate // request_tokens) * request_tokens

    return total


@dataclass
class Run:
    rates: list[tuple[float, int]]  # (t, tokensPerHour) per cycle with a forecast
    exhausts: list[tuple[float, float]]  # (t, forecast exhaustsAt - START, seconds)
    actual_exhaustion: float | None  # seconds after START the budget really runs out


def simulate(
    pattern: Callable[[float], int],
    budget: int,
    seconds: float,
    cycle: float = 10.0,
    start: datetime = START,
    history: History | None = None,
) -> Run:
    history = history or History()
    limits = Limits(tokens_per_day=budget)
    run = Run([], [], None)
    t = 0.0
    while t <= seconds:
        now = start + timedelta(seconds=t)
        used = pattern(t)
        if run.actual_exhaustion is None and used >= budget:
            run.actual_exhaustion = t
        rate = history.observe("k:sim/key", int(now.timestamp() * 1000), month_of(now), used)
        result = fc.forecast(rate, fc.token_budgets(limits, used, used, now), now)
        if result is not None:
            run.rates.append((t, result.rate.tokens_per_hour))
            if result.first is not None:
                run.exhausts.append((t, (result.first.at - start).total_seconds()))
        t += cycle
    if run.actual_exhaustion is None:  # extrapolate the pattern far enough to find it
        t = seconds
        while pattern(t) < budget and t < 40 * 86400:
            t += cycle
        run.actual_exhaustion = t if pattern(t) >= budget else math.inf
    return run


def report(label: str, pattern, tokens_per_hour: float, budget: int, seconds: float) -> str:
    run = simulate(pattern, budget, seconds)
    after = [(t, r) for t, r in run.rates if t >= 600]  # once 10 minutes of history exist
    rate_err = max(abs(r - tokens_per_hour) / tokens_per_hour for _, r in after)
    late = [(t, (e - run.actual_exhaustion)) for t, e in run.exhausts if t >= 600]
    worst_late = max(d for _, d in late)
    worst_early = min(d for _, d in late)
    return (
        f"{label:<28} true {tokens_per_hour:>8.0f} tok/h  forecast rate error max {rate_err * 100:5.1f}%  "
        f"exhaustsAt vs actual: {worst_early / 60:+7.1f} .. {worst_late / 60:+6.1f} min "
        f"(budget runs out {run.actual_exhaustion / 3600:.2f} h in)"
    )


def main() -> None:
    per_hour = 60_000
    print("forecast accuracy (10 s write-back cycle, reading from 10 min of traffic on):")
    print(report("steady", steady(per_hour), per_hour, 200_000, 3 * 3600))
    print(report("bursty (2 min of every 10)", bursty(per_hour), per_hour, 200_000, 3 * 3600))


if __name__ == "__main__":
    main()
