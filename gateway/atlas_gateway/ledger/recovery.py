"""Undo what a timed-out Redis call may have done.

An admission or settlement that timed out (or whose connection was lost) may have run, may still
run when a stalled Redis resumes and reads the queued command, or may never run. The caller has
moved on (its client got a 503, or, failing open, was let through); this process still owns the
request id, so it resolves it: ``undo.lua`` is idempotent per request id (a lease is the proof
that an admission ran unsettled, a tombstone makes a late admission lease nothing), and is
retried until Redis answers. Only the lease TTL bounds what a gateway that dies meanwhile leaves.

Behind Sentinel (replication is asynchronous) a failover can also lose settlements that *did*
succeed: during a switch the old master keeps answering until the sentinels demote it, and what
it wrote after the replica's promotion never reaches the new master, where those requests'
leases (replicated earlier) stay. So with ``replays`` on, the settlements of the last
``REPLAY_SECONDS`` are kept, and when the hot-path client connects to a different master they
are all resolved again through ``undo.lua``: a settlement whose lease the new master still holds
is settled there; one that arrived (or whose admission never did) changes nothing.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass

from .. import metrics
from ..auth.principal import Principal
from ..store.failures import REDIS_FAILURES, is_transport_failure, reply_kind
from .admission import Admission
from .script_args import NO_COST, key_calls

log = logging.getLogger("atlas_gateway")


@dataclass(slots=True)
class Unresolved:
    """A request whose admission (``admission``) or settlement outcome is unknown, until
    undo.lua resolves it; ``refused`` counts the times Redis refused the undo (a script error)."""

    principal: Principal
    request_id: str
    reserved: int
    actual: int
    admission: bool
    costs: tuple[bytes, bytes] = NO_COST
    refused: int = 0


@dataclass(frozen=True, slots=True)
class Acknowledged:
    """A settlement Redis acknowledged ``at`` (monotonic seconds), kept for a failover's replay."""

    at: float
    principal: Principal
    request_id: str
    reserved: int
    actual: int
    costs: tuple[bytes, bytes]


class Recovery:
    BATCH = 64  # undo calls in flight at once (pipelined on the hot-path connection)
    MAX_PENDING = 100_000  # bounded memory; beyond it, the lease TTL is the bound
    REPLY_ATTEMPTS = 5  # an undo that Redis refuses (script error) is not retried for ever
    # how far back a master switch can lose settlements: the old master answers until the
    # sentinels reconfigure it, about one INFO period (1 s) after the promotion; 10 s of margin
    REPLAY_SECONDS = 10.0

    def __init__(
        self, admission: Admission, first_delay: float = 0.05, max_delay: float = 1.0, replays: bool = False
    ) -> None:
        self.admission = admission
        self.replays = replays
        self.recent: deque[Acknowledged] = deque()
        self.first_delay = first_delay
        self.max_delay = max_delay
        self.pending: dict[str, Unresolved] = {}  # by request id
        self._task: asyncio.Task | None = None
        self._wakeup = asyncio.Event()
        metrics.REDIS_UNDO_PENDING.set_function(lambda: len(self.pending))

    def undo_admission(self, principal: Principal, request_id: str, reserved: int) -> None:
        self._add(principal, request_id, reserved, 0, True)

    def settle_later(
        self, principal: Principal, request_id: str, reserved: int, actual: int, costs: tuple[bytes, bytes] = NO_COST
    ) -> None:
        self._add(principal, request_id, reserved, actual, False, costs)

    def _add(
        self,
        principal: Principal,
        request_id: str,
        reserved: int,
        actual: int,
        admission: bool,
        costs: tuple[bytes, bytes] = NO_COST,
    ) -> None:
        if not key_calls(principal).leased:
            return  # nothing it left can outlive a minute: its buckets refill by themselves
        if len(self.pending) >= self.MAX_PENDING:
            metrics.count_redis_error("undo_dropped")
            return
        self.pending[request_id] = Unresolved(principal, request_id, reserved, actual, admission, costs)
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._run())
        self._wakeup.set()

    def settled(
        self, principal: Principal, request_id: str, reserved: int, actual: int, costs: tuple[bytes, bytes]
    ) -> None:
        """A settlement Redis acknowledged (kept for ``replay_after_failover``)."""
        if not key_calls(principal).leased:
            return
        now = time.monotonic()
        recent = self.recent
        recent.append(Acknowledged(now, principal, request_id, reserved, actual, costs))
        horizon = now - self.REPLAY_SECONDS
        while recent[0].at < horizon:
            recent.popleft()

    def replay_after_failover(self) -> None:
        """The hot-path client reached a new master: settle again what the old one may have lost."""
        horizon = time.monotonic() - self.REPLAY_SECONDS
        items = [item for item in self.recent if item.at >= horizon]
        self.recent.clear()
        if items:
            log.warning("Redis master changed: re-checking %d recent settlements on the new master", len(items))
        for item in items:
            self.settle_later(item.principal, item.request_id, item.reserved, item.actual, item.costs)

    def wake(self) -> None:
        """Redis answered again: retry now rather than after the back-off."""
        if self.pending:
            self._wakeup.set()

    async def _run(self) -> None:
        delay = self.first_delay
        while self.pending:
            self._wakeup.clear()  # before the batch: a wake-up during it is not lost
            batch = list(self.pending.values())[: self.BATCH]
            results = await asyncio.gather(*(self._one(item) for item in batch))
            if all(results):
                delay = self.first_delay
                continue
            # Redis still unreachable: wait, but wake at once when a new item arrives or a
            # request gets through to Redis again
            try:
                await asyncio.wait_for(self._wakeup.wait(), delay)
            except asyncio.TimeoutError:
                pass
            delay = min(self.max_delay, delay * 2)

    async def _one(self, item: Unresolved) -> bool:
        try:
            dropped = await self.admission.undo(
                item.principal, item.request_id, item.reserved, item.actual, admission=item.admission, costs=item.costs
            )
        except REDIS_FAILURES as exc:
            if is_transport_failure(exc):
                return False
            item.refused += 1
            metrics.count_redis_reply_error("undo", reply_kind(exc))
            if item.refused < self.REPLY_ATTEMPTS:
                return False
            log.error(
                "giving up undoing request %s: Redis refused it %d times (%s)", item.request_id, item.refused, exc
            )
        else:
            metrics.REDIS_UNDONE.labels("found" if dropped else "none").inc()
        self._forget(item.request_id)
        return True

    def _forget(self, request_id: str) -> None:
        self.pending.pop(request_id, None)

    async def drain(self, timeout: float) -> bool:
        """Wait (at shutdown) until nothing is pending, at most ``timeout`` seconds."""
        task = self._task
        if task is None or task.done():
            return not self.pending
        try:
            await asyncio.wait_for(asyncio.shield(task), timeout)
        except asyncio.TimeoutError:
            pass
        return not self.pending

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
