"""The cluster-wide in-flight count that shared shed thresholds compare against (shedder.py).

Every ``ATLAS_SHED_PUBLISH_SECONDS`` (default 0.2 s) each gateway process runs inflight.lua
once: it writes its own in-flight count (an entry that expires after ``TTL_INTERVALS``
intervals, on Redis's clock) and reads back the sum of the other live processes' in the same
round trip. Nothing happens per request: the hot path adds its live count to the last sum.

Staleness: another process's count is at most one interval (plus a round trip) old; a process
that died or lost Redis still counts until its entry expires, at most ``TTL_INTERVALS``
intervals. When this process cannot reach Redis for longer than that, the view is stale and
shared thresholds fall back to a per-process share (shedder.py): its own count times the
number of processes it last saw, so N processes together still shed at about the threshold.
"""

from __future__ import annotations

import asyncio
import logging
import time
from importlib import resources
from typing import Any

from atlas_core import contract

from .. import metrics
from ..store.failures import REDIS_FAILURES
from ..store.scripts import CallShape, RedisPyScript
from .shedder import Shedder

log = logging.getLogger("atlas_gateway")

INFLIGHT_LUA = resources.files(__package__).joinpath("inflight.lua").read_text()
TTL_INTERVALS = 3


class LoadView:
    def __init__(self, redis: Any, shedder: Shedder, process_id: str, interval: float) -> None:
        self.shedder = shedder
        self.process_id = process_id
        self.interval = interval
        self.ttl_ms = int(TTL_INTERVALS * interval * 1000)
        self.script = RedisPyScript(redis, INFLIGHT_LUA)
        self.shape = CallShape([contract.INFLIGHT_KEY.encode()], ())  # KEYS[1]; nothing fixed in ARGV
        self.redis = redis
        self.peers = 0  # other live processes at the last successful publish
        self.fresh_until = 0.0
        self._task: asyncio.Task | None = None

    @property
    def needed(self) -> bool:
        return any(limit > 0 for limit in self.shedder.shared.values())

    def start(self) -> None:
        if self.needed:
            self._task = asyncio.ensure_future(self._run())

    async def publish(self) -> None:
        """One round trip: publish this process's count, take in the others'."""
        now = time.monotonic()
        try:
            others, peers = await self.script(
                self.shape, (self.process_id.encode(), str(self.shedder.mine).encode(), str(self.ttl_ms).encode())
            )
        except REDIS_FAILURES:
            if now > self.fresh_until:  # stale: this process's share of each shared threshold
                self.shedder.others, self.shedder.scale = 0, self.peers + 1
            return
        self.peers = int(peers)
        self.shedder.others, self.shedder.scale = int(others), 1
        metrics.SHED_VIEW_OTHERS.set(self.shedder.others)
        metrics.SHED_VIEW_PEERS.set(self.peers)
        self.fresh_until = now + self.ttl_ms / 1000

    async def _run(self) -> None:
        while True:
            try:
                await self.publish()
            except Exception:  # noqa: BLE001 (the view must outlive any one failure)
                log.exception("publishing the in-flight count failed")
            await asyncio.sleep(self.interval)

    async def stop(self) -> None:
        if self._task is None:
            return
        self._task.cancel()
        try:
            await self._task
        except (asyncio.CancelledError, Exception):  # noqa: BLE001
            pass
        self._task = None
        try:  # leave at once rather than be counted until the entry expires
            await asyncio.wait_for(self.redis.hdel(contract.INFLIGHT_KEY, self.process_id), 1.0)
        except (*REDIS_FAILURES, asyncio.TimeoutError):
            pass
