"""Rotation with overlap (spec.rotationGracePeriod): which key hashes the gateway may accept.

Pure: given the hash Redis serves for an AtlasKey now, the previous key still in its grace
period (if any), the Secret's current hash, the grace period and the time, decide the next
state. store.write_key_config applies it; keys.reconcile_key turns it into status and Events.

    no previous ──Secret changes, grace > 0──▶ previous = old hash until now + grace
         ▲                                            │
         │      deadline reached, or the Secret       │
         └───── changes back to that key, or ─────────┘
                rotated again (the older one goes at once)

With a grace of 0 the old hash is dropped at once, as before.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from atlas_core.contract import PreviousKey

_DURATION = re.compile(r"(\d+)([hms])")
_UNIT = {"h": 3600, "m": 60, "s": 1}
MAX_GRACE_SECONDS = 720 * 3600  # the CRD's bound (an object stored before it may hold more)


def parse_duration(text: str | None) -> float:
    """``10m``, ``1h30m``, ``45s`` or ``0`` in seconds (the CRD's pattern admits nothing else),
    at most MAX_GRACE_SECONDS."""
    text = (text or "").strip()
    if text in ("", "0"):
        return 0.0
    parts = _DURATION.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"not a duration: {text!r}")
    return float(min(sum(int(n) * _UNIT[u] for n, u in parts), MAX_GRACE_SECONDS))


@dataclass(frozen=True)
class RotationStep:
    previous: PreviousKey | None  # the previous key to keep serving (None: none)
    drop: tuple[str, ...] = ()  # hashes whose config must go now
    rotated_from: str | None = None  # set when this step is a rotation
    retired: str | None = None  # set when a previous key's grace period just ended


def step(served: str | None, previous: PreviousKey | None, current: str, grace: float, now: float) -> RotationStep:
    """The next rotation state (see the module docstring)."""
    if served is not None and served != current:  # the Secret's key changed
        older = (previous.key_hash,) if previous and previous.key_hash not in (served, current) else ()
        if grace > 0:
            return RotationStep(PreviousKey(served, now + grace), older, rotated_from=served)
        return RotationStep(None, (served,) + older, rotated_from=served)
    if previous is None:
        return RotationStep(None)
    if previous.key_hash == current:  # rotated back to the previous key: it is the current one
        return RotationStep(None)
    if previous.until <= now:
        return RotationStep(None, (previous.key_hash,), retired=previous.key_hash)
    return RotationStep(previous)
