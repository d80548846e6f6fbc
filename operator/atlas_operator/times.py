"""Instants read from objects and Redis, always inside what a ``datetime`` holds.

Kubernetes admits RFC 3339 times that Python's parser refuses (``2027-01-01t00:00:00z``) or
cannot convert to UTC (``0001-01-01T00:00:00+01:00``); Redis may hold any number. Here an
instant past either end of the range saturates to that end instead of raising: "expired long
ago" and "expires in year 9999" lead to the same decisions as the exact value would.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

# A day inside Python's range at each end, so that shifting by any UTC offset stays inside.
EARLIEST = datetime(1, 1, 2, tzinfo=timezone.utc)
LATEST = datetime(9999, 12, 30, tzinfo=timezone.utc)
_EARLIEST_UNIX, _LATEST_UNIX = EARLIEST.timestamp(), LATEST.timestamp()


def rfc3339(at: datetime) -> str:
    utc = at.astimezone(timezone.utc)
    return f"{utc.year:04d}-{utc:%m-%dT%H:%M:%S}Z"  # %Y writes year 1 as "1" on glibc


def parse_rfc3339(value: str) -> datetime:
    """An RFC 3339 time as the API server's ``date-time`` format admits it (lowercase ``t`` and
    ``z``, any number of fraction digits, an offset), in UTC. ValueError when it is not one."""
    text = str(value).strip().upper()
    if text.endswith("Z"):
        text = text[:-1] + "+00:00"
    parsed = datetime.fromisoformat(text)
    offset = parsed.utcoffset()
    if offset is None:
        raise ValueError(f"{value!r} has no UTC offset")
    try:
        utc = (parsed.replace(tzinfo=None) - offset).replace(tzinfo=timezone.utc)
    except OverflowError:  # the offset carried it past year 1 or 9999
        return EARLIEST if offset > timedelta(0) else LATEST
    return min(max(utc, EARLIEST), LATEST)


def from_unix(seconds: float) -> datetime:
    """Unix seconds as a UTC datetime, saturating at EARLIEST and LATEST (NaN: EARLIEST)."""
    if not seconds >= _EARLIEST_UNIX:
        return EARLIEST
    if seconds > _LATEST_UNIX:
        return LATEST
    return datetime.fromtimestamp(seconds, tz=timezone.utc)
