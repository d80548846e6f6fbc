"""What `kubectl atlas usage` and `top` show, computed from AtlasKeys and AtlasQuotas as the API
server returns them (pure: no I/O).

A budget is a day or month limit next to the usage figure it limits. Adding one (a soft budget,
say) is one line in BUDGETS. The forecast of a tokens budget is the object's measured burn rate
(``status.forecast.tokensPerHour``, the operator's) run forward from what is left: it names the
moment the budget runs out when that is before it resets, else nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from decimal import Decimal, InvalidOperation
from typing import Any, Iterable

DAY, MONTH = "day", "month"


@dataclass(frozen=True)
class Budget:
    limit: str  # the field in spec.limits
    used: str  # the field in status.usage
    period: str  # DAY or MONTH: when it resets (UTC)
    tokens: bool  # counted in tokens (the burn rate applies), else in the price list's currency


BUDGETS = (
    Budget("tokensPerDay", "tokensToday", DAY, tokens=True),
    Budget("tokensPerMonth", "tokensThisMonth", MONTH, tokens=True),
    Budget("costPerDay", "costToday", DAY, tokens=False),
    Budget("costPerMonth", "costThisMonth", MONTH, tokens=False),
    # soft budgets: reached, requests are demoted to Sheddable (EXHAUSTS: when that begins)
    Budget("softTokensPerDay", "tokensToday", DAY, tokens=True),
    Budget("softTokensPerMonth", "tokensThisMonth", MONTH, tokens=True),
    Budget("softCostPerDay", "costToday", DAY, tokens=False),
    Budget("softCostPerMonth", "costThisMonth", MONTH, tokens=False),
)
KIND_NAMES = {"AtlasKey": "key", "AtlasQuota": "quota"}


@dataclass(frozen=True)
class Row:
    """One line of `usage`: one budget of one object (``budget`` None: the object has none)."""

    namespace: str
    kind: str  # "key" or "quota"
    name: str
    budget: str | None
    used: Decimal
    limit: Decimal | None
    tokens_per_hour: int | None
    exhausts_at: datetime | None  # runs out before it resets, at this rate

    @property
    def percent(self) -> float | None:
        if self.limit is None:
            return None
        return float(self.used * 100 / self.limit)

    def as_dict(self) -> dict[str, Any]:
        return {
            "namespace": self.namespace,
            "kind": self.kind,
            "name": self.name,
            "budget": self.budget,
            "used": _plain(self.used),
            "limit": None if self.limit is None else _plain(self.limit),
            "percent": None if self.percent is None else round(self.percent, 2),
            "tokensPerHour": self.tokens_per_hour,
            "exhaustsAt": rfc3339(self.exhausts_at),
        }


@dataclass(frozen=True)
class Burn:
    """One line of `top`: an object's burn rate now and today's figures."""

    namespace: str
    kind: str
    name: str
    tokens_per_hour: int | None
    basis: str | None
    tokens_today: int
    requests_today: int
    last_request: str | None

    def as_dict(self) -> dict[str, Any]:
        return {
            "namespace": self.namespace,
            "kind": self.kind,
            "name": self.name,
            "tokensPerHour": self.tokens_per_hour,
            "basis": self.basis,
            "tokensToday": self.tokens_today,
            "requestsToday": self.requests_today,
            "lastRequestTime": self.last_request,
        }


def usage_rows(objects: Iterable[dict[str, Any]], now: datetime) -> list[Row]:
    rows = []
    for obj in objects:
        meta, spec, status = obj.get("metadata") or {}, obj.get("spec") or {}, obj.get("status") or {}
        limits = spec.get("limits") or {}
        figures = current_usage(status.get("usage") or {}, now)
        rate = (status.get("forecast") or {}).get("tokensPerHour")
        ident = (
            meta.get("namespace") or "",
            KIND_NAMES.get(obj.get("kind"), obj.get("kind") or ""),
            meta.get("name") or "",
        )
        found = False
        for budget in BUDGETS:
            if limits.get(budget.limit) is None:
                continue
            found = True
            used, limit = _decimal(figures.get(budget.used)), _decimal(limits[budget.limit])
            exhausts = runs_out_at(limit - used, rate, reset_of(budget.period, now), now) if budget.tokens else None
            rows.append(Row(*ident, budget.limit, used, limit, rate if budget.tokens else None, exhausts))
        if not found:  # no day or month budget: show what it used today, limited by nothing of its own
            rows.append(Row(*ident, None, _decimal(figures.get("tokensToday")), None, rate, None))
    return rows


def burn_rows(objects: Iterable[dict[str, Any]], now: datetime) -> list[Burn]:
    out = []
    for obj in objects:
        meta, status = obj.get("metadata") or {}, obj.get("status") or {}
        forecast, figures = status.get("forecast") or {}, current_usage(status.get("usage") or {}, now)
        out.append(
            Burn(
                meta.get("namespace") or "",
                KIND_NAMES.get(obj.get("kind"), obj.get("kind") or ""),
                meta.get("name") or "",
                forecast.get("tokensPerHour"),
                forecast.get("basis"),
                int(figures.get("tokensToday") or 0),
                int(figures.get("requestsToday") or 0),
                figures.get("lastRequestTime"),
            )
        )
    return out


def current_usage(usage: dict[str, Any], now: datetime) -> dict[str, Any]:
    """``status.usage`` with the figures of a past day or month dropped: they are not today's
    (the operator rewrites them shortly after midnight; until then they would mislead)."""
    out = dict(usage)
    if usage.get("day") and usage["day"] != now.strftime("%Y-%m-%d"):
        for field in ("tokensToday", "requestsToday", "costToday", "lastRequestTime"):
            out.pop(field, None)
    if usage.get("month") and usage["month"] != now.strftime("%Y-%m"):
        for field in ("tokensThisMonth", "costThisMonth"):
            out.pop(field, None)
    return out


def reset_of(period: str, now: datetime) -> datetime:
    """The next UTC midnight (DAY) or first of the month (MONTH) after ``now``."""
    day = now.astimezone(timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0)
    if period == DAY:
        return day + timedelta(days=1)
    first = day.replace(day=1)
    return first.replace(year=first.year + 1, month=1) if first.month == 12 else first.replace(month=first.month + 1)


def runs_out_at(left: Decimal, tokens_per_hour: Any, resets_at: datetime, now: datetime) -> datetime | None:
    """When ``left`` tokens are gone at that rate, if before ``resets_at``; decided on seconds
    first so that no date is built from an unbounded number."""
    if left <= 0:
        return now
    if not isinstance(tokens_per_hour, (int, float)) or tokens_per_hour <= 0:
        return None
    seconds = float(left) * 3600.0 / float(tokens_per_hour)
    if seconds >= (resets_at - now).total_seconds():
        return None
    return now + timedelta(seconds=seconds)


def rfc3339(at: datetime | None) -> str | None:
    return None if at is None else at.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _decimal(value: Any) -> Decimal:
    try:
        return Decimal(str(value)) if value is not None else Decimal(0)
    except InvalidOperation:
        return Decimal(0)


def _plain(value: Decimal) -> int | str:
    """Tokens as an integer, money as the decimal string the status uses."""
    return int(value) if value == value.to_integral_value() else str(value.normalize())
