"""Usage write-back: counters from Redis into ``status.usage`` and the QuotaExhausted condition.

One cycle reads every subject's day and month hashes in pipelined batches (a few round trips for
10,000 keys), diffs them against the status the watch last delivered, and patches only the
objects whose figures changed. Each patch carries the resourceVersion it was computed from, so a
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
from .kube import CONFLICT, PATCHED, KubeApi
from .settings import KEYS, QUOTAS
from .views import ObjectView


@dataclass
class CycleStats:
    subjects: int = 0
    redis_round_trips: int = 0
    patches: int = 0
    conflicts: int = 0
    deferred: int = 0  # changes left for later cycles by the per-cycle write cap
    read_seconds: float = 0.0
    seconds: float = 0.0


def exhaustion(limits: Limits, usage: Usage) -> tuple[bool, str, str]:
    if limits.tokens_per_day is not None and usage.tokens_today >= limits.tokens_per_day:
        return True, cond.DAILY_BUDGET_SPENT, (
            f"tokensPerDay ({limits.tokens_per_day}) is spent for {usage.day}")
    if limits.tokens_per_month is not None and usage.tokens_this_month >= limits.tokens_per_month:
        return True, cond.MONTHLY_BUDGET_SPENT, (
            f"tokensPerMonth ({limits.tokens_per_month}) is spent for {usage.month}")
    return False, cond.WITHIN_BUDGET, "no day or month budget is spent"


def status_patch(
    view: ObjectView, usage: Usage, exhausted: tuple[bool, str, str], now: datetime,
    keys: int | None = None,
) -> dict[str, Any] | None:
    """The status fields to patch for one object, or None when everything already matches."""
    patch: dict[str, Any] = {}
    wanted_usage = usage.to_status()
    current_usage = view.status.get("usage")
    if current_usage != wanted_usage:
        # A merge patch merges nested objects: a field absent from the new figures (a new day
        # has no lastRequestTime yet) must be deleted explicitly or it would never converge.
        patch["usage"] = {**{k: None for k in current_usage or {} if k not in wanted_usage}, **wanted_usage}
    if keys is not None and view.status.get("keys") != keys:
        patch["keys"] = keys
    current = cond.find(view.status.get("conditions"), cond.QUOTA_EXHAUSTED)
    is_exhausted, reason, message = exhausted
    if current is None or (current.get("status"), current.get("reason"), current.get("message")) != (
        "True" if is_exhausted else "False", reason, message
    ):
        patch["conditions"] = cond.merge(view.status.get("conditions"), cond.QUOTA_EXHAUSTED,
                                         is_exhausted, reason, message, view.generation, now)
    return patch or None


def urgency(item: tuple[str, ObjectView, dict[str, Any]]) -> tuple[int, int]:
    """Order for a capped cycle: condition flips first, then quotas, then the biggest change."""
    plural, view, patch = item
    old = (view.status.get("usage") or {}).get("tokensToday", 0)
    new = (patch.get("usage") or {}).get("tokensToday", old)
    return (0 if "conditions" in patch else 1 if plural == QUOTAS else 2, -abs(new - old))


def plan(
    keys: Iterable[ObjectView], quotas: Iterable[ObjectView], usages: dict[str, Usage], now: datetime
) -> list[tuple[str, ObjectView, dict[str, Any]]]:
    """Every (plural, object, status patch) a cycle must write (pure: the diffing itself)."""
    # Objects not reconciled yet are left to their reconcile (which writes the first status):
    # patching them here would only make that reconcile's precondition fail.
    keys = [k for k in keys if not k.deleting]
    bound: dict[tuple[str, str], int] = {}
    for key in keys:
        if key.quota:
            bound[(key.namespace, key.quota)] = bound.get((key.namespace, key.quota), 0) + 1
    keys = [k for k in keys if "observedGeneration" in k.status]
    quotas = [q for q in quotas if not q.deleting and "observedGeneration" in q.status]
    quota_exhausted: dict[tuple[str, str], tuple[bool, str, str]] = {}
    out: list[tuple[str, ObjectView, dict[str, Any]]] = []
    for quota in quotas:
        usage = usages.get(contract.quota_subject(quota.namespace, quota.name))
        if usage is None:
            continue
        state = exhaustion(Limits.from_spec(quota.spec.get("limits")), usage)
        quota_exhausted[(quota.namespace, quota.name)] = state
        patch = status_patch(quota, usage, state, now, keys=bound.get((quota.namespace, quota.name), 0))
        if patch:
            out.append((QUOTAS, quota, patch))
    for key in keys:
        usage = usages.get(contract.key_subject(key.namespace, key.name))
        if usage is None:
            continue
        state = exhaustion(Limits.from_spec(key.spec.get("limits")), usage)
        shared = quota_exhausted.get((key.namespace, key.quota)) if key.quota else None
        if not state[0] and shared and shared[0]:
            state = (True, cond.SHARED_BUDGET_SPENT, f"AtlasQuota {key.quota!r}: {shared[2]}")
        patch = status_patch(key, usage, state, now)
        if patch:
            out.append((KEYS, key, patch))
    return out


async def read_all(redis: Any, subjects: list[str], now: datetime, batch: int) -> tuple[dict[str, Usage], int]:
    usages: dict[str, Usage] = {}
    trips = 0
    for start in range(0, len(subjects), batch):
        usages.update(await contract.read_usages(redis, subjects[start:start + batch], now))
        trips += 1
    return usages, trips


async def usage_cycle(
    redis: Any,
    kube: KubeApi,
    keys: list[ObjectView],
    quotas: list[ObjectView],
    now: datetime,
    batch: int = 5000,
    concurrency: int = 8,
    max_writes: int | None = None,
) -> CycleStats:
    started = time.perf_counter()
    stats = CycleStats()
    subjects = [contract.key_subject(k.namespace, k.name) for k in keys if not k.deleting]
    subjects += [contract.quota_subject(q.namespace, q.name) for q in quotas if not q.deleting]
    stats.subjects = len(subjects)
    usages, stats.redis_round_trips = await read_all(redis, subjects, now, batch)
    stats.read_seconds = time.perf_counter() - started

    todo = plan(keys, quotas, usages, now)
    if max_writes is not None and len(todo) > max_writes:
        # Protect the API server: each status patch costs it ~10 ms of CPU. What is left out
        # still differs next cycle and is written then (most urgent first).
        todo.sort(key=urgency)
        stats.deferred = len(todo) - max_writes
        todo = todo[:max_writes]
    gate = asyncio.Semaphore(concurrency)

    async def write(plural: str, view: ObjectView, patch: dict[str, Any]) -> str:
        async with gate:
            return await kube.patch_status(plural, view.namespace, view.name, patch, view.resource_version)

    results = await asyncio.gather(*(write(*item) for item in todo))
    stats.patches = sum(1 for r in results if r == PATCHED)
    stats.conflicts = sum(1 for r in results if r == CONFLICT)
    stats.seconds = time.perf_counter() - started
    return stats
