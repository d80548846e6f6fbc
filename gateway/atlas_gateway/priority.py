"""Priority classes and load shedding.

A request runs at its key's class; the ``x-atlas-priority`` header may lower it, never raise
it. When this process has many requests in flight upstream, classes are shed from the bottom:
Sheddable above ``ATLAS_SHED_THRESHOLD``, Standard above ``ATLAS_SHED_THRESHOLD_STANDARD``,
Critical above ``ATLAS_SHED_THRESHOLD_CRITICAL``; by default 1/2, 3/4 and all of the upstream
pool (settings.py: a threshold above the pool would only make requests wait for a pooled
connection into a 504). Shedding happens before admission, so a
shed request consumes nothing and costs no Redis round trip.
"""

from __future__ import annotations

from atlas_core.contract import PRIORITIES

RANK = {name: rank for rank, name in enumerate(PRIORITIES)}  # Critical 0 < Standard 1 < Sheddable 2
_BY_LOWER = {name.lower(): name for name in PRIORITIES}


def effective_priority(key_priority: str, requested: str | None) -> str:
    """The key's class, or a lower one if the request asks for it. Unknown values are ignored."""
    if not requested:
        return key_priority
    wanted = _BY_LOWER.get(requested.strip().lower())
    if wanted is None or RANK[wanted] < RANK[key_priority]:
        return key_priority
    return wanted


class Shedder:
    """Counts this process's in-flight upstream requests and decides what to shed.

    Requests between the shedding decision and the upstream call (their admission is awaiting
    Redis) count too: otherwise a burst would pass the check all at once, before any of it is
    in flight, and overrun the upstream pool the thresholds are derived from."""

    __slots__ = ("inflight", "admitting", "limits")

    def __init__(self, sheddable: int, standard: int, critical: int) -> None:
        self.inflight = 0
        self.admitting = 0
        # a class is shed once in-flight reaches its limit; <= 0 disables shedding for it
        self.limits = {"Sheddable": sheddable, "Standard": standard, "Critical": critical}

    def should_shed(self, priority: str) -> bool:
        limit = self.limits[priority]
        return 0 < limit <= self.inflight + self.admitting
