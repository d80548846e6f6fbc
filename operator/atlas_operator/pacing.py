"""How fast and in what order the usage write-back patches statuses (docs/operator.md, "Usage
write-back").

A status patch costs the API server a few milliseconds of CPU and an etcd write, so a fleet where
every key is busy cannot be written every cycle. Two pieces decide what goes out:

- :class:`TokenBucket`: client-go's flow control (``qps`` tokens a second, at most ``burst`` kept),
  shared by every cycle, so the rate bound holds over any window, not per cycle;
- :class:`StalenessQueue`: remembers since when each object's status has lagged behind Redis and
  orders the patches by it (condition flips first: a budget spent is news), so a fleet larger than
  one cycle's share is written round-robin by age instead of starving the quiet keys.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Awaitable, Callable

from .settings import KEYS
from .views import ObjectView

Item = tuple[str, ObjectView, dict[str, Any]]  # (plural, object, status patch), as usage.plan() returns
ObjectId = tuple[str, str, str]  # plural, namespace, name


def object_id(item: Item) -> ObjectId:
    plural, view, _ = item
    return plural, view.namespace, view.name


class TokenBucket:
    """``qps`` tokens a second, at most ``burst`` saved up (client-go's ``flowcontrol`` bucket)."""

    def __init__(
        self,
        qps: float,
        burst: int,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
    ) -> None:
        if qps <= 0:
            raise ValueError("qps must be > 0")
        self.qps = float(qps)
        self.burst = max(1, int(burst))
        self.clock = clock
        self.sleep = sleep
        self.tokens = float(self.burst)
        self.stamp = clock()

    def _refill(self) -> None:
        now = self.clock()
        self.tokens = min(float(self.burst), self.tokens + (now - self.stamp) * self.qps)
        self.stamp = now

    async def take(self, deadline: float | None = None) -> bool:
        """Take a token, waiting until it is due; False, taking nothing, when it would be due only
        after ``deadline`` (a clock() instant). Like x/time/rate, a token is reserved before the
        wait, so concurrent callers queue up one after the other instead of sharing one."""
        self._refill()
        wait = max(0.0, (1 - self.tokens) / self.qps)
        if deadline is not None and self.stamp + wait > deadline:
            return False
        self.tokens -= 1
        if wait > 0:
            await self.sleep(wait)
        return True


class StalenessQueue:
    """Orders a cycle's patches by how long each object's status has been behind, across cycles.

    ``since[obj]`` is the oldest instant the status could have started lagging: the cycle that
    first saw it differ, or, once written, the read whose figures the status now shows (a later
    change happened after it). Objects found in sync are forgotten.
    """

    ECHO_CYCLES = 3

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.since: dict[ObjectId, float] = {}
        # resourceVersion each object had when we last patched it, and the cycles since: while
        # the watch still shows that version, our patch has not come back yet and sending it
        # again would only conflict. After ECHO_CYCLES it is sent anyway (a patch the API server
        # found to change nothing keeps its resourceVersion: it must not wait forever).
        self.sent: dict[ObjectId, tuple[str, int]] = {}

    def order(self, todo: list[Item], read_at: float | None = None) -> tuple[list[Item], int]:
        """The patches to send, most urgent first, and how many wait for the watch to echo our
        last patch of their object (left out this cycle)."""
        read_at = self.clock() if read_at is None else read_at
        present = {object_id(item): item for item in todo}
        self.since = {oid: t for oid, t in self.since.items() if oid in present}
        ready, echo_pending = [], 0
        for oid, item in present.items():
            self.since.setdefault(oid, read_at)
            sent = self.sent.pop(oid, None)
            if sent is not None and sent[0] == item[1].resource_version and sent[1] < self.ECHO_CYCLES:
                self.sent[oid] = (sent[0], sent[1] + 1)
                echo_pending += 1
                continue
            ready.append(item)
        self.sent = {oid: rv for oid, rv in self.sent.items() if oid in present}
        ready.sort(key=self._urgency)
        return ready, echo_pending

    def written(self, item: Item, read_at: float) -> None:
        """``item``'s patch was accepted: its status shows the figures read at ``read_at``."""
        oid = object_id(item)
        self.sent[oid] = (item[1].resource_version, 0)
        self.since[oid] = read_at

    def _urgency(self, item: Item) -> tuple[int, float, int, int]:
        plural, view, patch = item
        old = (view.status.get("usage") or {}).get("tokensToday", 0)
        new = (patch.get("usage") or {}).get("tokensToday", old)
        change = abs(new - old) if isinstance(new, int) and isinstance(old, int) else 0
        return (0 if "conditions" in patch else 1, self.since[object_id(item)], 1 if plural == KEYS else 0, -change)

    def staleness(self, now: float | None = None) -> float:
        """Seconds the longest-waiting object has been behind (0 when all are in sync)."""
        if not self.since:
            return 0.0
        now = self.clock() if now is None else now
        lagging = [t for oid, t in self.since.items() if oid not in self.sent]
        return max(0.0, now - min(lagging)) if lagging else 0.0
