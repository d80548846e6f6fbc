"""One timer for all keys: wakes at the earliest ``expiresAt`` and re-reconciles that key.

A heap instead of a kopf daemon per key: 10,000 keys cost 10,000 heap entries, not 10,000
sleeping tasks. Entries are only hints; a stale one just triggers a harmless reconcile.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
from datetime import datetime, timezone
from typing import Awaitable, Callable

log = logging.getLogger(__name__)


class ExpiryScheduler:
    def __init__(self, fire: Callable[[str, str], Awaitable[None]]) -> None:
        self._fire = fire
        self._heap: list[tuple[float, str, str]] = []
        self._wake = asyncio.Event()

    def schedule(self, namespace: str, name: str, when: datetime) -> None:
        heapq.heappush(self._heap, (when.timestamp(), namespace, name))
        self._wake.set()

    def due(self, now: float) -> list[tuple[str, str]]:
        out = []
        while self._heap and self._heap[0][0] <= now:
            _, namespace, name = heapq.heappop(self._heap)
            if (namespace, name) not in out:
                out.append((namespace, name))
        return out

    def next_at(self) -> float | None:
        return self._heap[0][0] if self._heap else None

    async def run(self) -> None:
        while True:
            now = datetime.now(timezone.utc).timestamp()
            for namespace, name in self.due(now):
                try:
                    await self._fire(namespace, name)
                except asyncio.CancelledError:
                    raise
                except Exception:  # one failing key must not stop the timer for the others
                    log.exception("expiry re-reconcile of %s/%s failed", namespace, name)
            nxt = self.next_at()
            self._wake.clear()
            timeout = None if nxt is None else max(0.0, nxt - datetime.now(timezone.utc).timestamp())
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=timeout)
            except asyncio.TimeoutError:
                pass
