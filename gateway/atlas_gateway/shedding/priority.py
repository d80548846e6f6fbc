"""A request's priority class: its key's class (Critical, Standard, Sheddable), which the
``x-atlas-priority`` header may lower, never raise."""

from __future__ import annotations

from atlas_core.contract import PRIORITIES

RANK = {name: rank for rank, name in enumerate(PRIORITIES)}  # Critical 0 < Standard 1 < Sheddable 2
SHEDDABLE = PRIORITIES[-1]  # the class shed first, and that of a request past a soft budget
_BY_LOWER = {name.lower(): name for name in PRIORITIES}


def effective_priority(key_priority: str, requested: str | None) -> str:
    """The key's class, or a lower one if the request asks for it. Unknown values are ignored."""
    if not requested:
        return key_priority
    wanted = _BY_LOWER.get(requested.strip().lower())
    if wanted is None or RANK[wanted] < RANK[key_priority]:
        return key_priority
    return wanted
