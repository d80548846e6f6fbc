"""RFC 7386 JSON merge patch, as the API server applies a ``application/merge-patch+json``
status patch: for the stand-ins of the Kubernetes API (the unit tests' fake, the operator's
scale benchmark), which must see what the real one would store."""

from __future__ import annotations

import copy
from typing import Any


def merge_patch(target: Any, patch: Any) -> Any:
    """Objects merge, null deletes, everything else (lists too) replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out
