"""metav1.Condition helpers: merge one condition into a list without touching the others.

``lastTransitionTime`` only moves when ``status`` changes, so re-applying the same state is a
no-op and the status patch that would carry it is skipped entirely.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from .times import rfc3339

READY = "Ready"
QUOTA_EXHAUSTED = "QuotaExhausted"
BUDGET_AT_RISK = "BudgetAtRisk"  # the forecast says a day/month budget runs out before it resets
# What GitOps tools read (docs/gitops.md, docs/api.md "Conditions for people and tools"):
# Ready=True once the object is in effect as declared (a key suspended or expired on purpose
# too); Stalled=True, present only then, on a configuration error that will not fix itself
# (kstatus: Failed); Serving (AtlasKey) says whether the gateway accepts the key.
STALLED = "Stalled"
SERVING = "Serving"
# AtlasKey/AtlasQuota with a soft budget (its own, or its quota's): True while one is passed and
# requests are admitted as Sheddable; absent on an object without soft budgets.
DEMOTED = "Demoted"
# Present only while the usage write-back cannot show this object's usage (failures.py): True,
# with what failed; removed once its usage is written again.
USAGE_STALE = "UsageStale"

# Ready=False reasons (also the KeyConfig.refusal values the gateway understands).
SECRET_INVALID = "SecretInvalid"
QUOTA_NOT_FOUND = "QuotaNotFound"
PRICE_LIST_NOT_FOUND = "PriceListNotFound"  # spec.priceListRef names no AtlasPriceList
SUSPENDED = "Suspended"
EXPIRED = "Expired"
ACTIVE = "Active"
# Refusals that are what was declared: the key is in effect (Ready=True) and refuses traffic.
DECLARED_REFUSALS = frozenset({SUSPENDED, EXPIRED})
PRICES_INVALID = "PricesInvalid"  # an AtlasPriceList the operator cannot turn into prices
SUBJECT_CONFLICT = "SubjectConflict"  # a spec.subjects entry is bound by an earlier AtlasKey
SUBJECT_UNUSABLE = "SubjectUnusable"  # a spec.subjects entry no trusted token can name

WITHIN_BUDGET = "WithinBudget"
DAILY_BUDGET_SPENT = "DailyBudgetSpent"
MONTHLY_BUDGET_SPENT = "MonthlyBudgetSpent"
SHARED_BUDGET_SPENT = "SharedQuotaSpent"

WITHIN_SOFT_BUDGET = "WithinSoftBudget"  # Demoted=False
SHARED_SOFT_BUDGET_PASSED = "SharedQuotaSoftBudgetPassed"  # Demoted=True on a key: its quota's is passed
# Demoted=True on the object itself names the soft budget: "SoftTokensPerDayPassed", ...

NO_FORECAST = "NoForecast"  # BudgetAtRisk=False: too little history, or no recent usage
FORECAST_FAILED = "ForecastFailed"  # BudgetAtRisk=Unknown: computing the forecast failed

# UsageStale=True reasons
USAGE_UNREADABLE = "UsageUnreadable"  # its counters in Redis do not parse
WRITE_BACK_FAILED = "WriteBackFailed"  # planning its status failed
STATUS_REFUSED = "StatusPatchRefused"  # the API server refused its status patch
# BudgetAtRisk=True reasons name the budget: "TokensPerDayAtRisk", "TokensPerMonthAtRisk".


def at_risk_reason(budget: str) -> str:
    return budget[:1].upper() + budget[1:] + "AtRisk"


def soft_budget_reason(budget: str) -> str:
    return budget[:1].upper() + budget[1:] + "Passed"


def find(conditions: list[dict[str, Any]] | None, ctype: str) -> dict[str, Any] | None:
    for cond in conditions or ():
        if cond.get("type") == ctype:
            return cond
    return None


def merge(
    conditions: list[dict[str, Any]] | None,
    ctype: str,
    status: bool | None,
    reason: str,
    message: str,
    generation: int | None,
    now: datetime,
) -> list[dict[str, Any]]:
    """A new list with ``ctype`` set (``status`` None: Unknown); other conditions are kept
    unchanged and in order."""
    wanted = "Unknown" if status is None else "True" if status else "False"
    old = find(conditions, ctype)
    new: dict[str, Any] = {
        "type": ctype,
        "status": wanted,
        "reason": reason,
        "message": message,
        "lastTransitionTime": old["lastTransitionTime"]
        if old and old.get("status") == wanted and old.get("lastTransitionTime")
        else rfc3339(now),
    }
    if generation is not None:
        new["observedGeneration"] = generation
    out = [dict(c) for c in conditions or () if c.get("type") != ctype]
    # Keep the original position so an unchanged list compares equal.
    position = next((i for i, c in enumerate(conditions or ()) if c.get("type") == ctype), len(out))
    out.insert(position, new)
    return out


def without(conditions: list[dict[str, Any]] | None, ctype: str) -> list[dict[str, Any]]:
    return [dict(c) for c in conditions or () if c.get("type") != ctype]


def with_verdict(
    conditions: list[dict[str, Any]] | None,
    in_effect: bool,
    reason: str,
    message: str,
    generation: int | None,
    now: datetime,
) -> list[dict[str, Any]]:
    """Ready, and Stalled with the same reason while the object is not in effect (a configuration
    error: nothing will change until its cause does), removed otherwise."""
    out = merge(conditions, READY, in_effect, reason, message, generation, now)
    if in_effect:
        return without(out, STALLED)
    return merge(out, STALLED, True, reason, message, generation, now)
