"""Admission and settlement: one atomic Lua call each (admit.lua, settle.lua).

``Admission.admit`` checks and reserves across the key's and its quota's limits and returns a
:class:`Decision` carrying the rate-limit header values; ``Admission.settle`` ends the request.
Times inside the scripts come from Redis ``TIME`` so that gateway clocks never disagree about
buckets and leases; only the calendar (which day/month hash) comes from the gateway clock.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from importlib import resources
from typing import TYPE_CHECKING, Any

from atlas_core import contract

from ..auth.principal import Principal
from ..http import errors
from ..store.fastredis import FastRedis
from ..store.scripts import FastScript, RedisPyScript
from .limits import REFUSALS, SHED_DEMOTED, SOFT_BUDGETS
from .script_args import NO_COST, ScriptCalls, key_calls

if TYPE_CHECKING:
    from ..store.cluster import ClusterFastRedis


def _lua(*names: str) -> str:
    """One script's source: the named files of this package, in order (a shared part first)."""
    return "\n".join(resources.files(__package__).joinpath(name).read_text() for name in names)


ADMIT_LUA = _lua("admit.lua")
SETTLE_LUA = _lua("lease_totals.lua", "settle.lua")
REFRESH_LUA = _lua("refresh.lua")
UNDO_LUA = _lua("lease_totals.lua", "undo.lua")


def format_duration(ms: int) -> str:
    """OpenAI-style reset durations: ``250ms``, ``1.5s``, ``6m0s``, ``2h3m4s``."""
    if ms < 1000:
        return f"{max(0, int(ms))}ms"
    seconds = ms / 1000
    if seconds < 60:
        return f"{seconds:.3f}".rstrip("0").rstrip(".") + "s"
    whole = int(-(-ms // 1000))
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes}m{secs}s" if hours else f"{minutes}m{secs}s"


class Calendar:
    """UTC day/month strings and the time until each ends, recomputed once per second."""

    __slots__ = ("_second", "day", "month", "day_end", "month_end")

    def __init__(self) -> None:
        self._second = -1

    def refresh(self, now: float | None = None) -> "Calendar":
        now = time.time() if now is None else now
        second = int(now)
        if second != self._second:
            moment = datetime.fromtimestamp(second, tz=timezone.utc)
            self.day = contract.day_of(moment)
            self.month = contract.month_of(moment)
            midnight = moment.replace(hour=0, minute=0, second=0, microsecond=0)
            self.day_end = midnight.timestamp() + 86400
            if moment.month == 12:
                nxt = midnight.replace(year=moment.year + 1, month=1, day=1)
            else:
                nxt = midnight.replace(month=moment.month + 1, day=1)
            self.month_end = nxt.timestamp()
            self._second = second
        return self

    def ms_until_day_end(self, now: float) -> int:
        return max(1000, int((self.day_end - now) * 1000))

    def ms_until_month_end(self, now: float) -> int:
        return max(1000, int((self.month_end - now) * 1000))


class Decision:
    """``reserved``: the tokens admit.lua reserved, lower than asked when a Shrink budget lowered
    the completion cap (the caller derives the cap it must forward from it). ``demoted``: the
    soft budget (its CRD name) the request passes, or None; ``demoted_by`` the index of the
    subject it belongs to (1: the key, 2: its quota)."""

    __slots__ = ("admitted", "reason", "subject", "retry_ms", "headers", "reserved", "demoted", "demoted_by")

    def __init__(self, reply: list[Any]) -> None:
        self.admitted = reply[0] == 1
        self.reason = int(reply[1])
        self.subject = int(reply[2])
        self.retry_ms = int(reply[3])
        self.headers = rate_limit_headers(*(int(v) for v in reply[4:10]))
        self.reserved = int(reply[10])
        self.demoted = SOFT_BUDGETS[int(reply[11])]
        self.demoted_by = int(reply[12])


def rate_limit_headers(rl: int, rr: int, rs: int, tl: int, tr: int, ts: int) -> list[tuple[bytes, bytes]]:
    """x-ratelimit-* for the tightest limit of each kind; a kind with no limit anywhere is omitted."""
    out: list[tuple[bytes, bytes]] = []
    if rl >= 0:
        out += [
            (b"x-ratelimit-limit-requests", str(rl).encode()),
            (b"x-ratelimit-remaining-requests", str(rr).encode()),
            (b"x-ratelimit-reset-requests", format_duration(rs).encode()),
        ]
    if tl >= 0:
        out += [
            (b"x-ratelimit-limit-tokens", str(tl).encode()),
            (b"x-ratelimit-remaining-tokens", str(tr).encode()),
            (b"x-ratelimit-reset-tokens", format_duration(ts).encode()),
        ]
    return out


class QueueFull(Exception):
    """``max_waiting`` admissions already wait for Redis: this one is refused unsent."""


class Admission:
    """``Admission(client)`` runs the scripts through a redis-py-compatible asyncio client
    (fakeredis in unit tests); ``Admission(fast=FastRedis(...))`` through the hot-path client.
    What each call sends is built by :class:`script_args.ScriptCalls`, the same for both.

    ``max_waiting`` (0 = no bound) bounds the admissions of this process waiting for Redis at
    once: past it, ``admit`` raises :class:`QueueFull` without sending anything (the caller
    answers 503 + Retry-After). A healthy Redis answering a burst in turn is then never taken
    for a Redis outage, nor made to queue calls without bound (docs/design-decisions.md)."""

    def __init__(
        self,
        redis: Any = None,
        lease_ttl_seconds: float = 300.0,
        *,
        fast: FastRedis | ClusterFastRedis | None = None,
        max_waiting: int = 0,
    ) -> None:
        def runner(source: str) -> Any:
            return FastScript(fast, source) if fast is not None else RedisPyScript(redis, source)

        self._admit = runner(ADMIT_LUA)
        self._settle = runner(SETTLE_LUA)
        self._refresh = runner(REFRESH_LUA)
        self._undo = runner(UNDO_LUA)
        self.calls = ScriptCalls(lease_ttl_seconds)
        self.lease_ttl_seconds = lease_ttl_seconds
        # a request still upstream after this long refreshes its leases (and again after as long)
        self.refresh_interval = lease_ttl_seconds / 3
        self.calendar = Calendar()
        self.max_waiting = max_waiting
        self.waiting = 0  # admissions sent to Redis and not answered yet

    async def admit(
        self,
        principal: Principal,
        request_id: str,
        reserve: int,
        prompt: int | None = None,
        sequences: int = 0,
        costs: tuple[bytes, bytes] = NO_COST,
        shed_if_demoted: bool = False,
    ) -> Decision:
        """Reserve ``reserve`` tokens, of which ``prompt`` are the prompt and the rest a
        completion cap times ``sequences`` (which a Shrink budget may lower), and ``costs``
        (micro-units per subject, :func:`calls.cost_args`) on cost-limited subjects.
        ``shed_if_demoted``: Sheddable requests are being shed, so a request a soft budget demotes
        is refused (reason SHED_DEMOTED) instead of admitted. :class:`QueueFull`: refused unsent."""
        if self.max_waiting and self.waiting >= self.max_waiting:
            raise QueueFull()
        now = time.time()
        cal = self.calendar.refresh(now)
        shape, _ = self.calls.shapes(principal, cal.day, cal.month)
        dynamic = self.calls.admit_args(
            request_id,
            reserve,
            cal.ms_until_day_end(now),
            cal.ms_until_month_end(now),
            reserve if prompt is None else prompt,
            sequences,
            costs,
            shed_if_demoted,
        )
        self.waiting += 1
        try:
            return Decision(await self._admit(shape, dynamic))
        finally:
            self.waiting -= 1

    async def settle(
        self, principal: Principal, request_id: str, reserved: int, actual: int, costs: tuple[bytes, bytes] = NO_COST
    ) -> int:
        cal = self.calendar.refresh()
        _, shape = self.calls.shapes(principal, cal.day, cal.month)
        return int(await self._settle(shape, self.calls.settle_args(request_id, actual, reserved, costs)))

    async def undo(
        self,
        principal: Principal,
        request_id: str,
        reserved: int,
        actual: int,
        *,
        admission: bool,
        costs: tuple[bytes, bytes] = NO_COST,
    ) -> int:
        """Resolve a request whose admission (``admission=True``) or settlement outcome is
        unknown (undo.lua): idempotent, so a caller retries it until Redis answers. Returns the
        leases it dropped."""
        cal = self.calendar.refresh()
        shape = self.calls.undo_shape(principal, cal.day, cal.month)
        return int(
            await self._undo(
                shape, self.calls.settle_args(request_id, actual, reserved, costs), self.calls.undo_tail(admission)
            )
        )

    async def refresh(self, principal: Principal, request_id: str) -> int:
        """Push the leases of a request still in flight forward by the lease TTL (refresh.lua);
        returns how many were refreshed (0: already settled or expired)."""
        if not key_calls(principal).leased:
            return 0
        return int(await self._refresh(self.calls.refresh_shape(principal), self.calls.refresh_args(request_id)))


def _owner(principal: Principal, index: int) -> str:
    """``AtlasKey ns/name`` or ``AtlasQuota ns/name`` of the script's subject ``index`` (1-based)."""
    subject = principal.subjects[index - 1] if index else principal.subjects[0]
    return ("AtlasQuota " + subject[2:]) if subject.startswith("q:") else ("AtlasKey " + subject[2:])


def rejection(decision: Decision, principal: Principal, reserve: int) -> errors.GatewayError:
    """The 429 a refused admission turns into, with a real Retry-After (seconds, rounded up),
    or the 503 of a demoted request shed. The caller adds ``decision.headers`` (the
    x-ratelimit-* values, and x-atlas-demoted) itself."""
    if decision.reason == SHED_DEMOTED:
        return errors.shed()
    retry_after = max(1, -(-decision.retry_ms // 1000))
    return REFUSALS[decision.reason].error(refusing_owner(decision, principal), reserve, retry_after)


def refusing_owner(decision: Decision, principal: Principal) -> str:
    """``AtlasKey ns/name`` or ``AtlasQuota ns/name``: whose limit refused the admission."""
    return _owner(principal, decision.subject)


def demotion_header(decision: Decision, principal: Principal) -> tuple[bytes, bytes]:
    """``x-atlas-demoted: <soft budget>; owner="AtlasQuota ns/name"``: which soft budget made this
    request Sheddable, and whose it is."""
    owner = _owner(principal, decision.demoted_by)
    return b"x-atlas-demoted", f'{decision.demoted}; owner="{owner}"'.encode()
