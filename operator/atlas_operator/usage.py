"""Usage write-back: counters from Redis into ``status.usage``, the QuotaExhausted condition,
and (with a :class:`~.history.History`) ``status.forecast`` and the BudgetAtRisk condition.

One cycle reads every subject's day and month hashes in pipelined batches (a few round trips for
10,000 keys), diffs them against the status the watch last delivered, and patches only the
objects whose figures changed. A forecast is rewritten only when it changed meaningfully
(forecast.changed_meaningfully), so a steady burn does not turn every cycle into a patch per
subject. Each patch carries the resourceVersion it was computed from, so a
concurrent reconcile is never overwritten: a conflict is simply retried next cycle.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Iterable

from atlas_core import contract
from atlas_core.contract import Limits, Usage

from . import conditions as cond
from . import failures
from . import forecast as fc
from .carry_over import CarryOver
from .history import History
from .kube import CONFLICT, PATCHED, KubeApi
from .pacing import StalenessQueue, TokenBucket
from .settings import KEYS, KIND_OF, QUOTAS
from .views import ObjectView


@dataclass
class CycleStats:
    subjects: int = 0
    redis_round_trips: int = 0
    patches: int = 0
    conflicts: int = 0
    deferred: int = 0  # changes left for later cycles by the write rate (pacing.py)
    echo_pending: int = 0  # patched last cycle, the watch has not shown it yet: not sent again
    forecasts: int = 0  # subjects with a forecast this cycle
    history_writes: int = 0  # subject histories written to Redis this cycle
    failed: int = 0  # objects this cycle could not serve (their own failures: failures.py)
    read_seconds: float = 0.0
    plan_seconds: float = 0.0  # diffing, forecasts included
    history_seconds: float = 0.0  # reading and writing forecast histories in Redis
    seconds: float = 0.0


def exhaustion(limits: Limits, usage: Usage) -> tuple[bool, str, str]:
    if limits.tokens_per_day is not None and usage.tokens_today >= limits.tokens_per_day:
        return True, cond.DAILY_BUDGET_SPENT, (f"tokensPerDay ({limits.tokens_per_day}) is spent for {usage.day}")
    if limits.tokens_per_month is not None and usage.tokens_this_month >= limits.tokens_per_month:
        return (
            True,
            cond.MONTHLY_BUDGET_SPENT,
            (f"tokensPerMonth ({limits.tokens_per_month}) is spent for {usage.month}"),
        )
    if limits.cost_per_day is not None and (usage.cost_today or 0) >= contract.to_micro(limits.cost_per_day):
        return True, cond.DAILY_BUDGET_SPENT, f"costPerDay ({limits.cost_per_day}) is spent for {usage.day}"
    if limits.cost_per_month is not None and (usage.cost_this_month or 0) >= contract.to_micro(limits.cost_per_month):
        return True, cond.MONTHLY_BUDGET_SPENT, (f"costPerMonth ({limits.cost_per_month}) is spent for {usage.month}")
    return False, cond.WITHIN_BUDGET, "no day or month budget is spent"


def demotion(limits: Limits, usage: Usage) -> tuple[bool, str, str] | None:
    """The Demoted condition of an object with soft budgets, from its settled usage; None for
    one without (it shows no such condition)."""
    if not limits.soft_limited:
        return None
    passed = contract.soft_limit_passed(limits, usage)
    if passed is None:
        return False, cond.WITHIN_SOFT_BUDGET, "no soft budget is passed: requests keep their priority"
    budget, limit = passed
    shown = contract.format_micro(limit) if "Cost" in budget else limit
    period = usage.day if budget.endswith("Day") else usage.month
    return (
        True,
        cond.soft_budget_reason(budget),
        (f"{budget} ({shown}) is passed for {period}: requests are admitted as Sheddable"),
    )


def key_demotion(
    own: tuple[bool, str, str] | None, quota: str | None, shared: tuple[bool, str, str] | None
) -> tuple[bool, str, str] | None:
    """A key's Demoted condition: its own, or its AtlasQuota's when that one is passed (every
    request of the key is demoted then too)."""
    if shared is not None and shared[0] and not (own and own[0]):
        return True, cond.SHARED_SOFT_BUDGET_PASSED, f"AtlasQuota {quota!r}: {shared[2]}"
    return own if own is not None else shared


# (namespace, name, kind, forecast) of every subject with a forecast, for the operator's metrics
Observed = list[tuple[str, str, str, "fc.Forecast"]]
NO_FORECAST = object()  # forecasting off: status.forecast is left alone
# (loop, plural, object, what failed) of every object a cycle could not serve (failures.py)
Failed = list[tuple[str, str, ObjectView, "BaseException | str"]]


@dataclass(frozen=True)
class ForecastFailed:
    """Computing the forecast failed: the forecast is withdrawn, BudgetAtRisk is Unknown, and
    the usage is written all the same."""

    message: str


def _merge_fields(current: dict[str, Any] | None, wanted: dict[str, Any] | None) -> dict[str, Any] | None:
    """A merge patch turning ``current`` into ``wanted`` (absent fields deleted explicitly)."""
    if wanted is None:
        return None
    return {**{k: None for k in current or {} if k not in wanted}, **wanted}


def at_risk_condition(forecast: "fc.Forecast | ForecastFailed | None") -> tuple[bool | None, str, str]:
    if isinstance(forecast, ForecastFailed):
        return None, cond.FORECAST_FAILED, f"the forecast could not be computed: {forecast.message}"
    if forecast is None:
        return False, cond.NO_FORECAST, "too little history, or no usage recently, to forecast"
    first = forecast.first
    if first is None:
        return False, cond.WITHIN_BUDGET, ("at the current burn rate no day or month budget runs out before it resets")
    budget = first.budget
    return (
        True,
        cond.at_risk_reason(budget.name),
        (
            f"{budget.name} ({budget.limit}) runs out at {cond.rfc3339(first.at)} at "
            f"{forecast.rate.tokens_per_hour} tokens/hour ({forecast.rate.basis}), before it resets "
            f"at {cond.rfc3339(budget.resets_at)}"
        ),
    )


def status_patch(
    view: ObjectView,
    usage: Usage,
    exhausted: tuple[bool, str, str],
    now: datetime,
    keys: int | None = None,
    forecast: Any = NO_FORECAST,
    events: list[tuple[str, str, str]] | None = None,
    demoted: tuple[bool, str, str] | None = None,
) -> dict[str, Any] | None:
    """The status fields to patch for one object, or None when everything already matches.

    ``forecast`` (a Forecast, ForecastFailed or None) is applied only when it differs
    meaningfully from what the status shows; an Event for BudgetAtRisk turning True is appended
    to ``events``. A UsageStale condition left by an earlier failure is removed. ``demoted``
    (:func:`demotion`) is the Demoted condition; None removes it.
    """
    patch: dict[str, Any] = {}
    wanted_usage = usage.to_status(priced=bool(view.spec.get("priceListRef")))
    current_usage = view.status.get("usage")
    if current_usage != wanted_usage:
        # A merge patch merges nested objects: a field absent from the new figures (a new day
        # has no lastRequestTime yet) must be deleted explicitly or it would never converge.
        patch["usage"] = _merge_fields(current_usage, wanted_usage)
    if keys is not None and view.status.get("keys") != keys:
        patch["keys"] = keys
    conditions = view.status.get("conditions")
    if cond.find(conditions, cond.USAGE_STALE) is not None:
        patch["conditions"] = conditions = cond.without(conditions, cond.USAGE_STALE)
    current = cond.find(conditions, cond.QUOTA_EXHAUSTED)
    is_exhausted, reason, message = exhausted
    if current is None or (current.get("status"), current.get("reason"), current.get("message")) != (
        "True" if is_exhausted else "False",
        reason,
        message,
    ):
        patch["conditions"] = conditions = cond.merge(
            conditions, cond.QUOTA_EXHAUSTED, is_exhausted, reason, message, view.generation, now
        )
    shown_demoted = cond.find(conditions, cond.DEMOTED)
    if demoted is None:
        if shown_demoted is not None:
            patch["conditions"] = conditions = cond.without(conditions, cond.DEMOTED)
    elif shown_demoted is None or (
        shown_demoted.get("status"),
        shown_demoted.get("reason"),
        shown_demoted.get("message"),
    ) != ("True" if demoted[0] else "False", *demoted[1:]):
        patch["conditions"] = conditions = cond.merge(conditions, cond.DEMOTED, *demoted, view.generation, now)
    if forecast is not NO_FORECAST:
        shown = view.status.get("forecast")
        wanted = forecast.to_status() if isinstance(forecast, fc.Forecast) else None
        at_risk = cond.find(conditions, cond.BUDGET_AT_RISK)
        risky, reason, message = at_risk_condition(forecast)
        failing = isinstance(forecast, ForecastFailed)
        shown_failing = (at_risk or {}).get("reason") == cond.FORECAST_FAILED
        # a forecast failure shows at once (and when it changes); so does its end
        failure_news = (failing and (at_risk or {}).get("message") != message) or (shown_failing and not failing)
        if fc.changed_meaningfully(shown, wanted, now) or (at_risk is None and wanted is not None) or failure_news:
            if wanted is not None or shown is not None:
                patch["forecast"] = _merge_fields(shown, wanted)
            if at_risk is not None or wanted is not None or failing:
                patch["conditions"] = cond.merge(
                    conditions, cond.BUDGET_AT_RISK, risky, reason, message, view.generation, now
                )
                if risky and (at_risk is None or at_risk.get("status") != "True") and events is not None:
                    events.append(("Warning", cond.BUDGET_AT_RISK, message))
    return patch or None


def stale_patch(view: ObjectView, reason: str, message: str, now: datetime) -> dict[str, Any] | None:
    """The UsageStale condition saying why this object's usage is not shown, or None when the
    status already says so (then a failing object costs no write per cycle)."""
    conditions = view.status.get("conditions")
    shown = cond.find(conditions, cond.USAGE_STALE)
    if shown is not None and (shown.get("status"), shown.get("reason"), shown.get("message")) == (
        "True",
        reason,
        message,
    ):
        return None
    return {"conditions": cond.merge(conditions, cond.USAGE_STALE, True, reason, message, view.generation, now)}


def _forecast(history: History | None, subject: str, limits: Limits, usage: Usage, now: datetime, now_ms: int) -> Any:
    if history is None:
        return NO_FORECAST
    rate = history.observe(subject, now_ms, usage.month, usage.tokens_this_month)
    if rate is None:
        return None
    return fc.forecast(rate, fc.token_budgets(limits, usage.tokens_today, usage.tokens_this_month, now), now)


def plan(
    keys: Iterable[ObjectView],
    quotas: Iterable[ObjectView],
    usages: dict[str, Usage],
    now: datetime,
    history: History | None = None,
    observed: Observed | None = None,
    events: dict[tuple[str, str, str], list[tuple[str, str, str]]] | None = None,
    unreadable: dict[str, str] | None = None,
    failed: Failed | None = None,
) -> list[tuple[str, ObjectView, dict[str, Any]]]:
    """Every (plural, object, status patch) a cycle must write (the diffing itself).

    With ``history``, each subject's reading also feeds its burn-rate history (the only state
    this touches); ``observed`` collects every forecast and ``events`` the Events to post once
    the patch of (plural, namespace, name) is written. Each object is planned on its own: one
    whose counters are ``unreadable`` (subject -> why) or whose planning fails gets the
    UsageStale condition instead, and lands in ``failed``; a failing forecast only withdraws
    that object's forecast. The others are planned as usual.
    """
    observed = observed if observed is not None else []
    events = events if events is not None else {}
    unreadable = unreadable or {}
    failed = failed if failed is not None else []
    now_ms = int(now.timestamp() * 1000)
    # Objects not reconciled yet are left to their reconcile (which writes the first status):
    # patching them here would only make that reconcile's precondition fail.
    keys = [k for k in keys if not k.deleting]
    bound: dict[tuple[str, str], int] = {}
    for key in keys:
        if key.quota:
            bound[(key.namespace, key.quota)] = bound.get((key.namespace, key.quota), 0) + 1
    # per AtlasQuota: its QuotaExhausted and Demoted states, which its keys' follow
    quota_notices: dict[tuple[str, str], tuple[tuple[bool, str, str], tuple[bool, str, str] | None]] = {}
    out: list[tuple[str, ObjectView, dict[str, Any]]] = []
    # quotas first: a key's QuotaExhausted follows its quota's
    todo = [(QUOTAS, q, contract.quota_subject(q.namespace, q.name)) for q in quotas if not q.deleting]
    todo += [(KEYS, k, contract.key_subject(k.namespace, k.name)) for k in keys]
    for plural, view, subject in todo:
        if not view.status.get("observedGeneration"):  # the CRD defaults it to 0 until the first reconcile
            continue
        posted: list[tuple[str, str, str]] = []
        try:
            if subject in unreadable:
                failed.append((failures.USAGE, plural, view, unreadable[subject]))
                patch = stale_patch(view, cond.USAGE_UNREADABLE, unreadable[subject], now)
            elif subject not in usages:
                continue
            else:
                patch = _plan_object(
                    plural,
                    view,
                    subject,
                    usages[subject],
                    now,
                    now_ms,
                    history,
                    observed,
                    posted,
                    bound,
                    quota_notices,
                    failed,
                )
        except Exception as exc:  # noqa: BLE001 - this object's failure, reported; the cycle goes on
            failed.append((failures.USAGE, plural, view, exc))
            patch = stale_patch(
                view, cond.WRITE_BACK_FAILED, f"its status could not be planned: {failures.describe(exc)}", now
            )
        if patch:
            out.append((plural, view, patch))
            if posted:
                events[(plural, view.namespace, view.name)] = posted
    return out


def _plan_object(
    plural: str,
    view: ObjectView,
    subject: str,
    usage: Usage,
    now: datetime,
    now_ms: int,
    history: History | None,
    observed: Observed,
    posted: list[tuple[str, str, str]],
    bound: dict[tuple[str, str], int],
    quota_notices: dict[tuple[str, str], tuple[Any, Any]],
    failed: Failed,
) -> dict[str, Any] | None:
    limits = Limits.from_spec(view.spec.get("limits"))
    state = exhaustion(limits, usage)
    demoted = demotion(limits, usage)
    if plural == QUOTAS:
        quota_notices[(view.namespace, view.name)] = state, demoted
    elif view.quota:
        shared, shared_demoted = quota_notices.get((view.namespace, view.quota), (None, None))
        if shared and shared[0] and not state[0]:
            state = (True, cond.SHARED_BUDGET_SPENT, f"AtlasQuota {view.quota!r}: {shared[2]}")
        demoted = key_demotion(demoted, view.quota, shared_demoted)
    try:
        forecast = _forecast(history, subject, limits, usage, now, now_ms)
    except Exception as exc:  # noqa: BLE001 - withdraws this forecast only; the usage is still written
        failed.append((failures.FORECAST, plural, view, exc))
        forecast = ForecastFailed(failures.describe(exc))
    if isinstance(forecast, fc.Forecast):
        observed.append((view.namespace, view.name, KIND_OF[plural], forecast))
    keys = bound.get((view.namespace, view.name), 0) if plural == QUOTAS else None
    return status_patch(view, usage, state, now, keys=keys, forecast=forecast, events=posted, demoted=demoted)


async def read_all(
    redis: Any,
    subjects: list[str],
    now: datetime,
    batch: int,
    tags: dict[str, str] | None = None,
    unreadable: dict[str, str] | None = None,
) -> tuple[dict[str, Usage], int]:
    usages: dict[str, Usage] = {}
    trips = 0
    for start in range(0, len(subjects), batch):
        usages.update(await contract.read_usages(redis, subjects[start : start + batch], now, tags, unreadable))
        trips += 1
    return usages, trips


def slot_tags(keys: Iterable[ObjectView]) -> dict[str, str]:
    """subject -> slot tag of every AtlasKey bound to a quota (the others' tag is their subject)."""
    return {
        contract.key_subject(k.namespace, k.name): contract.slot_tag(k.namespace, k.name, k.quota)
        for k in keys
        if k.quota
    }


async def usage_cycle(
    redis: Any,
    kube: KubeApi,
    keys: list[ObjectView],
    quotas: list[ObjectView],
    now: datetime,
    batch: int = 5000,
    concurrency: int = 8,
    bucket: TokenBucket | None = None,
    queue: StalenessQueue | None = None,
    deadline: float | None = None,
    history: History | None = None,
    observed: Observed | None = None,
    carry_over: "CarryOver | None" = None,
    tracker: "failures.Failures | None" = None,
) -> CycleStats:
    """One write-back cycle. Patches go out stalest first (``queue``, which remembers across
    cycles), each taking a token from ``bucket`` (the rate bound, also across cycles); what has
    no token before ``deadline`` (a ``bucket.clock`` instant) waits for the next cycle, which
    re-reads it. Without a bucket every patch goes out at once. With ``history``, forecasts
    too; ``observed`` collects them. With ``carry_over``, first the usage counted under the v1
    contract (an upgrade in progress). ``tracker`` learns which objects failed and which work
    again (a fresh one when omitted)."""
    started = time.perf_counter()
    queue = queue if queue is not None else StalenessQueue()
    read_at = queue.clock()
    stats = CycleStats()
    tracker = tracker if tracker is not None else failures.Failures()
    subjects = [contract.key_subject(k.namespace, k.name) for k in keys if not k.deleting]
    subjects += [contract.quota_subject(q.namespace, q.name) for q in quotas if not q.deleting]
    stats.subjects = len(subjects)
    tags = slot_tags(k for k in keys if not k.deleting)
    unreadable: dict[str, str] = {}
    if carry_over is not None:
        stats.redis_round_trips += await carry_over.cycle(redis, subjects, now, tags, batch, unreadable)
    usages, trips = await read_all(redis, subjects, now, batch, tags, unreadable)
    stats.redis_round_trips += trips
    stats.read_seconds = time.perf_counter() - started
    if history is not None:
        mark = time.perf_counter()
        stats.redis_round_trips += await history.load(redis, subjects, batch)
        history.forget(set(subjects))
        stats.history_seconds = time.perf_counter() - mark

    observed = observed if observed is not None else []
    events: dict[tuple[str, str, str], list[tuple[str, str, str]]] = {}
    failed: Failed = []
    mark = time.perf_counter()
    todo = plan(
        keys,
        quotas,
        usages,
        now,
        history=history,
        observed=observed,
        events=events,
        unreadable=unreadable,
        failed=failed,
    )
    stats.plan_seconds = time.perf_counter() - mark
    stats.forecasts = len(observed)
    if history is not None:
        mark = time.perf_counter()
        stats.history_writes = history.pending
        stats.redis_round_trips += await history.flush(redis)
        stats.history_seconds += time.perf_counter() - mark
    todo, stats.echo_pending = queue.order(todo, read_at)
    pending = iter(todo)
    results: list[str] = []

    async def write(plural: str, view: ObjectView, patch: dict[str, Any]) -> str:
        try:
            result = await kube.patch_status(plural, view.namespace, view.name, patch, view.resource_version)
        except Exception as exc:  # noqa: BLE001 - this object's failure; the other writes go on
            failed.append((failures.USAGE, plural, view, exc))
            await _show_refusal(kube, plural, view, patch, exc, now)
            return REFUSED
        if result == PATCHED:  # a conflicted patch is retried next cycle, with its Event
            queue.written((plural, view, patch), read_at)
            for event in events.get((plural, view.namespace, view.name), ()):
                await kube.post_event(plural, view.event_target(), *event)
        return result

    async def writer() -> None:
        # Each of ``concurrency`` writers takes the next patch in order, then a token for it:
        # the order holds and at most ``concurrency`` patches are in flight. No token before
        # the deadline: the rest wait for the next cycle (which re-reads their figures).
        for item in pending:
            if bucket is not None and not await bucket.take(deadline):
                return
            results.append(await write(*item))

    await asyncio.gather(*(writer() for _ in range(concurrency)))
    stats.deferred = len(todo) - len(results)
    stats.patches = sum(1 for r in results if r == PATCHED)
    stats.conflicts = sum(1 for r in results if r == CONFLICT)
    stats.failed = len({(plural, view.namespace, view.name) for _, plural, view, _ in failed})
    await report(kube, tracker, failed, keys, quotas)
    stats.seconds = time.perf_counter() - started
    return stats


REFUSED = "refused"  # the patch raised (the API server refused it, or did not answer)
EVENTS_PER_CYCLE = 50
EVENT_REASONS = {failures.USAGE: "UsageWriteBackFailed", failures.FORECAST: "ForecastFailed"}


async def _show_refusal(
    kube: KubeApi, plural: str, view: ObjectView, patch: dict[str, Any], exc: Exception, now: datetime
) -> None:
    """After a refused status patch, try the UsageStale condition alone: a patch the API server
    refuses for one of its values may still take a condition saying so."""
    stale = stale_patch(view, cond.STATUS_REFUSED, f"the status patch was refused: {failures.describe(exc)}", now)
    if stale is None or set(patch) == {"conditions"}:
        return
    try:
        await kube.patch_status(plural, view.namespace, view.name, stale, view.resource_version)
    except Exception:  # noqa: BLE001 - the Event posted by report() still says it
        pass


async def report(
    kube: KubeApi,
    tracker: "failures.Failures",
    failed: Failed,
    keys: list[ObjectView],
    quotas: list[ObjectView],
    max_events: int = EVENTS_PER_CYCLE,
) -> None:
    """Tell ``tracker`` what failed and what works again; post the Event of each new failure,
    at most ``max_events`` per cycle (a bug failing every object must not become 10,000 API
    calls in one cycle: the others are posted in the next ones)."""
    seen: set[tuple[str, str, str, str]] = set()
    posted = 0
    for loop, plural, view, error in failed:
        obj = (KIND_OF[plural], view.namespace, view.name)
        if (loop, *obj) in seen:
            continue
        seen.add((loop, *obj))
        tracker.failed(loop, obj, error)
        if posted < max_events and tracker.take_report(loop, obj):
            posted += 1
            await kube.post_event(
                plural,
                view.event_target(),
                "Warning",
                EVENT_REASONS[loop],
                f"{loop} failed: {failures.describe(error)}",
            )
    if tracker.failing:
        for plural, views in ((KEYS, keys), (QUOTAS, quotas)):
            for view in views:
                obj = (KIND_OF[plural], view.namespace, view.name)
                for loop in (failures.USAGE, failures.FORECAST):
                    if (loop, *obj) not in seen:
                        tracker.succeeded(loop, obj)
