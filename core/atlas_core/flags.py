"""Yes/no values, read one way everywhere: environment settings of both planes
(``ATLAS_REDIS_CLUSTER``, ``ATLAS_FORWARD_PRIORITY``, ``ATLAS_FORECAST``...), Redis URL options
(``ssl_check_hostname``) and the test tiers' ``CI``."""

from __future__ import annotations

from typing import overload

TRUE = frozenset({"1", "t", "true", "y", "yes", "on"})
FALSE = frozenset({"0", "f", "false", "n", "no", "off"})


@overload
def parse_flag(raw: str | None, default: bool) -> bool: ...
@overload
def parse_flag(raw: str | None, default: None = None) -> bool | None: ...
def parse_flag(raw: str | None, default: bool | None = None) -> bool | None:
    """``raw`` as a boolean: unset or blank is ``default``; any case and surrounding spaces are
    accepted; anything but a word of :data:`TRUE` or :data:`FALSE` is a ValueError naming it."""
    if raw is None or not raw.strip():
        return default
    word = raw.strip().lower()
    if word in TRUE:
        return True
    if word in FALSE:
        return False
    raise ValueError(f"{raw!r} is neither true nor false (one of {', '.join(sorted(TRUE | FALSE))})")
