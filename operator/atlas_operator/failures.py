"""A failure on one object is that object's own (docs/operator.md, "When one object fails").

Every loop and handler of the operator runs each object on its own and reports what failed to
:class:`Failures`: it counts the failure for ``/metrics`` (by loop, kind, namespace and name),
logs it once when it starts or says something new (with its traceback unless the API server or
Redis was merely unreachable), and once more when the object works again. Posting the Event
(once per failure: :meth:`Failures.take_report`) or setting the condition is the caller's: it
knows the object. A loop that fails as a whole (Redis unreachable) is reported the same way,
by loop.

Messages name what failed, never key material: they are built from exception texts (Redis
values, API answers, arithmetic) and land in logs, Events and conditions.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import Counter

import redis.exceptions

log = logging.getLogger("atlas_operator")

# loops (the metric's ``loop`` label)
USAGE = "usage write-back"
FORECAST = "forecast"
HEAL = "self-healing"
RECONCILE = "reconcile"
EXPIRY = "expiry"
PRICE_LIST_STATUS = "price list status"
ISSUERS = "token issuers"

MESSAGE_LIMIT = 400  # a condition message holds 32 KiB; an Event's is cut at 1 KiB
RETRY_MAX = 300.0  # seconds between retries of an object that keeps failing

Object = tuple[str, str, str]  # (kind, namespace, name)

_TRANSIENT = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    redis.exceptions.BusyLoadingError,
    redis.exceptions.TryAgainError,
    redis.exceptions.ClusterDownError,
    redis.exceptions.ReadOnlyError,
    redis.exceptions.MasterDownError,
    OSError,
    TimeoutError,
    asyncio.TimeoutError,
)


def _api_status(exc: BaseException) -> int | None:
    """The HTTP status of a Kubernetes client ApiException (duck-typed: kubernetes is imported
    lazily), else None."""
    status = getattr(exc, "status", None)
    return status if isinstance(status, int) and hasattr(exc, "reason") else None


def describe(error: BaseException | str) -> str:
    """One line saying what failed, for a log, an Event and a condition message."""
    if isinstance(error, str):
        text = error
    elif (status := _api_status(error)) is not None:
        try:
            detail = json.loads(getattr(error, "body", None) or "{}").get("message") or ""
        except (ValueError, AttributeError):
            detail = ""
        reason = getattr(error, "reason", "")
        text = f"the API server answered {status} {reason}" + (f": {detail}" if detail else "")
    else:
        text = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
    return text if len(text) <= MESSAGE_LIMIT else text[: MESSAGE_LIMIT - 3] + "..."


def transient(error: BaseException | str) -> bool:
    """Redis or the API server unreachable, busy, or failing over: an outage, not a bug (its
    log line needs no traceback)."""
    if isinstance(error, str):
        return False
    if isinstance(error, _TRANSIENT):
        return True
    status = _api_status(error)
    if status is not None:
        return status in (0, 429) or status >= 500
    return type(error).__module__.startswith("urllib3")  # the API client's connection errors


class Failures:
    def __init__(self) -> None:
        self.failing: dict[tuple[str, str, str, str], str] = {}  # (loop, kind, ns, name) -> message
        self.counts: Counter[tuple[str, str, str, str]] = Counter()
        self.streaks: Counter[tuple[str, str, str, str]] = Counter()  # failures since it last worked
        self.unreported: set[tuple[str, str, str, str]] = set()  # new failures whose Event is due
        self.loops_failing: dict[str, str] = {}
        self.loop_counts: Counter[str] = Counter()

    def failed(self, loop: str, obj: Object, error: BaseException | str) -> bool:
        """Count a failure of ``obj`` in ``loop``; True when it is new or says something new.
        Logged only then, and its Event becomes due (take_report)."""
        ident = (loop, *obj)
        message = describe(error)
        self.counts[ident] += 1
        self.streaks[ident] += 1
        if self.failing.get(ident) == message:
            return False
        self.failing[ident] = message
        self.unreported.add(ident)
        kind, namespace, name = obj
        bug = error if isinstance(error, BaseException) and not transient(error) else None  # with its traceback
        log.warning(
            "%s %s/%s: %s failed: %s (logged once; the others go on)",
            kind,
            namespace,
            name,
            loop,
            message,
            exc_info=bug,
        )
        return True

    def take_report(self, loop: str, obj: Object) -> bool:
        """True once per failure (and again when it says something new): post its Event now.
        A caller that posts only so many Events at a time takes the others in later rounds."""
        if (loop, *obj) in self.unreported:
            self.unreported.discard((loop, *obj))
            return True
        return False

    def succeeded(self, loop: str, obj: Object) -> None:
        if self.failing and self.failing.pop((loop, *obj), None) is not None:
            self.streaks.pop((loop, *obj), None)
            self.unreported.discard((loop, *obj))
            log.info("%s %s/%s: %s works again", *obj, loop)

    def retry_in(self, loop: str, obj: Object) -> float:
        """Seconds to wait before retrying ``obj``: 2, 4, 8 ... up to RETRY_MAX."""
        streak = min(max(self.streaks[(loop, *obj)], 1), 16)  # bounded: 2.0 ** 1100 overflows
        return min(2.0**streak, RETRY_MAX)

    def forget(self, live: set[Object]) -> None:
        """Drop what is known of objects that no longer exist (their series vanish)."""
        for ident in [i for i in self.counts if i[1:] not in live]:
            del self.counts[ident]
            self.failing.pop(ident, None)
            self.streaks.pop(ident, None)
            self.unreported.discard(ident)

    def loop_failed(self, loop: str, error: BaseException) -> None:
        self.loop_counts[loop] += 1
        message = describe(error)
        if self.loops_failing.get(loop) != message:
            self.loops_failing[loop] = message
            log.warning(
                "%s failed: %s (logged once until it changes or recovers)",
                loop,
                message,
                exc_info=None if transient(error) else error,
            )

    def loop_succeeded(self, loop: str) -> None:
        if self.loops_failing.pop(loop, None) is not None:
            log.info("%s works again", loop)


class ObjectFailed(Exception):
    """Raised to a handler after its object's failure was reported; ``retry_in``: when to try
    again (backing off while it keeps failing)."""

    def __init__(self, message: str, retry_in: float) -> None:
        super().__init__(message)
        self.retry_in = retry_in
