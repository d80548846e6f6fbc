"""Following a Sentinel failover, including one that leaves the old master running.

A crashed master drops every connection, and the clients reconnect to whatever the sentinels
name. A *planned* switch (``SENTINEL FAILOVER``, or a master cut off from the sentinels but not
from the gateway) does not: the sentinels promote a replica while the old master keeps
accepting writes until they reconfigure it, which Sentinel does only after it has reported the
wrong role for a while (seconds). What the gateway writes there meanwhile is lost when the old
master resyncs from the new one: settlements (usage would read low, budgets overshoot) and
admissions.

So the gateway *fences* the hot-path client while a failover is under way:

* it subscribes to every sentinel's events; the sentinel leading a failover announces each step
  (``+try-failover`` ... ``+selected-slave`` ... ``+switch-master``) before it takes it. On a
  step before the promotion, the hot-path connection is dropped and no master is handed out
  (calls fail as "Redis unreachable": 503 when failing closed) until ``+promoted-slave`` names
  the promoted replica (used from then on, seconds before every sentinel names it), the
  failover is aborted, or ``FENCE_SECONDS`` pass (then ``ROLE`` is checked on every connection
  as always);
* every ``interval`` seconds (ATLAS_REDIS_SENTINEL_CHECK_SECONDS) it also asks the sentinels
  which master they name, and drops the connection when that is not the one it uses: a missed
  event costs at most one interval of writes to a demoted master, which the ledger's recovery.py then
  re-applies on the new master where it can (settlements whose lease the new master still holds).
"""

from __future__ import annotations

import asyncio
import logging

import redis.asyncio as aioredis

from atlas_core import sentinel
from atlas_core.sentinel import MasterUnavailable

from .fastredis import FastRedis

log = logging.getLogger("atlas_gateway")

# Steps of a failover before (or at) the promotion: stop writing to the old master now.
FENCE_EVENTS = (
    "+try-failover",
    "+elected-leader",
    "+failover-state-select-slave",
    "+selected-slave",
    "+failover-state-send-slaveof-noone",
    "+failover-state-wait-promotion",
)
# The leader saw the replica it chose report the master role: "slave <ip>:<port> <ip> <port> @ ..."
PROMOTED = "+promoted-slave"
# The failover ended: the sentinels name a master again (or kept the old one).
END_EVENTS = (
    "+switch-master",
    "-failover-abort-not-elected",
    "-failover-abort-no-good-slave",
    "-failover-abort-slave-timeout",
    "-failover-abort-master-is-back",
    "+failover-end",
)
FENCE_SECONDS = 10.0  # longest a failover may fence traffic without announcing its end


class MasterWatch:
    def __init__(self, fast: FastRedis, redis, interval: float) -> None:
        self.fast = fast
        self.redis = redis  # redis-py client on a SentinelConnectionPool
        self.interval = interval
        self._tasks: list[asyncio.Task] = []

    def start(self) -> None:
        locator = self.fast.locator
        if locator is None:
            return
        if self.interval > 0:
            self._tasks.append(asyncio.ensure_future(self._poll()))
        for host, port in locator.config.sentinels:
            self._tasks.append(asyncio.ensure_future(self._listen(locator.config, host, port)))

    # ------------------------------------------------------------------ events
    def on_event(self, channel: str, data: str) -> None:
        locator = self.fast.locator
        words = data.split()
        if locator is None or locator.config.master not in words:
            return  # another master that sentinel watches
        if channel in FENCE_EVENTS and not locator.fenced:
            log.warning(
                "Redis Sentinel: failover of %s under way (%s): holding Redis calls until it ends",
                locator.config.master,
                channel,
            )
            locator.fence(FENCE_SECONDS)
            self.fast.disconnect()
        elif channel == PROMOTED and len(words) >= 4 and words[0] == "slave":
            # the new master takes writes now, seconds before the failover ends and every
            # sentinel names it: go there (ROLE is checked on connecting)
            log.warning("Redis Sentinel: %s promoted to master of %s", words[1], locator.config.master)
            locator.unfence(promoted=(words[2], int(words[3])), seconds=FENCE_SECONDS)
            self.fast.disconnect()
        elif channel in END_EVENTS and (locator.fenced or locator.promoted is not None):
            log.warning("Redis Sentinel: failover of %s ended (%s)", locator.config.master, channel)
            locator.unfence()

    async def _listen(self, config: sentinel.SentinelUrl, host: str, port: int) -> None:
        client = aioredis.Redis(host=host, port=port, **sentinel.sentinel_kwargs(config, None))
        try:
            while True:
                pubsub = client.pubsub(ignore_subscribe_messages=True)
                try:
                    await pubsub.subscribe(*FENCE_EVENTS, PROMOTED, *END_EVENTS)
                    async for message in pubsub.listen():
                        if message and message.get("type") == "message":
                            self.on_event(_text(message["channel"]), _text(message["data"]))
                except asyncio.CancelledError:
                    raise
                except Exception:  # noqa: BLE001 (a sentinel down or restarting: try again)
                    await asyncio.sleep(1.0)
                finally:
                    await pubsub.aclose()
        finally:
            await client.aclose()

    # ------------------------------------------------------------------ polling
    async def check(self) -> bool:
        """One look; True when the hot-path connection was dropped for a new master."""
        locator = self.fast.locator
        if locator is None:
            return False  # not Sentinel: start() starts no watch
        try:
            named = await locator.address()
        except (MasterUnavailable, OSError, asyncio.TimeoutError):
            return False  # none named (or fenced) right now: calls fail and reconnect by themselves
        pool = getattr(self.redis, "connection_pool", None)
        if pool is not None and hasattr(pool, "get_master_address"):
            try:
                await pool.get_master_address()  # redis-py drops its idle connections on a change
            except Exception:  # noqa: BLE001 (its own errors; the next command reconnects anyway)
                pass
        current = self.fast.master
        if current is None or named == current:
            return False
        log.warning(
            "the sentinels name a new Redis master %s:%d (was %s:%d): reconnecting",
            named[0],
            named[1],
            current[0],
            current[1],
        )
        self.fast.disconnect()
        return True

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.check()
            except Exception:  # noqa: BLE001 (the watch must outlive any one failure)
                log.exception("checking the Redis master failed")

    async def stop(self) -> None:
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            try:
                await task
            except (asyncio.CancelledError, Exception):  # noqa: BLE001
                pass


def _text(value) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)
