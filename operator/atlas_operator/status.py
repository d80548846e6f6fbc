"""The status both kinds' reconciles write: the fields an object starts with, the difference
from what it shows, and the patch (with a resourceVersion precondition: a conflict means that
the object moved on, so the caller re-reads it and runs again)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from atlas_core import contract

from . import conditions as cond
from .kube import CONFLICT, GONE, KubeApi
from .settings import KIND_OF


class StatusConflict(Exception):
    """The object changed while we reconciled it: re-read and run again."""


def starting_fields(
    status: dict[str, Any], conditions: list[dict[str, Any]], generation: int | None, now: datetime
) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """``conditions`` with QuotaExhausted started False when absent (the usage loop owns it: it
    then only writes real changes), and the zero usage to show when the status has none yet."""
    if cond.find(conditions, cond.QUOTA_EXHAUSTED) is None:
        conditions = cond.merge(
            conditions,
            cond.QUOTA_EXHAUSTED,
            False,
            cond.WITHIN_BUDGET,
            "no day or month budget is spent",
            generation,
            now,
        )
    usage = None
    if "usage" not in status:
        usage = contract.Usage(day=contract.day_of(now), month=contract.month_of(now)).to_status()
    return conditions, usage


def status_delta(current: dict[str, Any] | None, desired: dict[str, Any]) -> dict[str, Any]:
    """The fields of ``desired`` that differ from ``current`` (None values delete a field)."""
    current = current or {}
    return {k: v for k, v in desired.items() if not (current.get(k) == v or (v is None and k not in current))}


async def write_status(kube: KubeApi, plural: str, obj: dict[str, Any], desired: dict[str, Any]) -> bool:
    """Patch what differs from ``obj``'s status; True when a patch was written."""
    delta = status_delta(obj.get("status"), desired)
    if not delta:
        return False
    meta = obj["metadata"]
    result = await kube.patch_status(plural, meta["namespace"], meta["name"], delta, meta.get("resourceVersion"))
    if result == CONFLICT:
        raise StatusConflict(f"{KIND_OF[plural]} {meta['namespace']}/{meta['name']} changed during reconcile")
    return result != GONE
