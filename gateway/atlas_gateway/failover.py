"""Following a Sentinel failover that leaves the old master running.

A crashed master drops every connection, and the clients reconnect to whatever the sentinels
name. A *planned* switch (``SENTINEL FAILOVER``, or a master cut off from the sentinels but not
from the gateway) does not: the sentinels promote a replica, and the old master keeps accepting
writes until they reconfigure it, which Redis Sentinel does only after it has reported the wrong
role for several INFO periods (seconds). Whatever the gateway writes there meanwhile is lost when
the old master resyncs from the new one.

So every ``interval`` seconds (ATLAS_REDIS_SENTINEL_CHECK_SECONDS) one task asks the sentinels
for the master; when they name another one than the hot-path client is connected to, that
connection is dropped (its pending calls fail as transport failures: recovery resolves them on
the new master), and redis-py's pool is told too. The window in which writes can go to a
demoted master is therefore about one interval; recovery.py re-applies the settlements of that
window on the new master.
"""

from __future__ import annotations

import asyncio
import logging

from atlas_core.sentinel import MasterUnavailable

from .fastredis import FastRedis

log = logging.getLogger("atlas_gateway")


class MasterWatch:
    def __init__(self, fast: FastRedis, redis, interval: float) -> None:
        self.fast = fast
        self.redis = redis  # redis-py client on a SentinelConnectionPool
        self.interval = interval
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        if self.fast.locator is not None and self.interval > 0:
            self._task = asyncio.ensure_future(self._run())

    async def check(self) -> bool:
        """One look; True when the hot-path connection was dropped for a new master."""
        try:
            named = await self.fast.locator.address()
        except (MasterUnavailable, OSError, asyncio.TimeoutError):
            return False  # no master named right now: calls fail (and reconnect) by themselves
        pool = getattr(self.redis, "connection_pool", None)
        if hasattr(pool, "get_master_address"):
            try:
                await pool.get_master_address()  # redis-py drops its idle connections on a change
            except Exception:  # noqa: BLE001 (its own errors; the next command reconnects anyway)
                pass
        current = self.fast.master
        if current is None or named == current:
            return False
        log.warning("the sentinels name a new Redis master %s:%d (was %s:%d): reconnecting",
                    named[0], named[1], current[0], current[1])
        self.fast.disconnect()
        return True

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.check()
            except Exception:  # noqa: BLE001 (the watch must outlive any one failure)
                log.exception("checking the Redis master failed")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):  # noqa: BLE001
                pass
            self._task = None
