"""Upgrade from the v1 Redis contract: carry the current day's and month's usage over.

v2 renamed every counter (hash tags for Redis Cluster). Config needs no migration: a v2
operator finds no v2 config epoch and rewrites all config (heal.py). Counters are the
gateway's, so the operator cannot rename them; instead, each usage cycle while the v1 config
epoch exists, it reads every subject's v1 day and month hashes and mirrors what they counted
into the v2 hashes (carry_over.lua: idempotent, so a v1 gateway still serving during a rolling
upgrade is carried over too, one cycle late). Once every gateway runs v2, deleting the v1 keys
(docs/redis-contract.md) ends it; until then it costs one more pipelined read per cycle.
"""

from __future__ import annotations

import logging
from datetime import datetime
from importlib import resources
from typing import Any, Mapping

from atlas_core import contract

log = logging.getLogger("atlas_operator")

CARRY_OVER_LUA = resources.files(__package__).joinpath("carry_over.lua").read_text()


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class CarryOver:
    def __init__(self) -> None:
        self.active: bool | None = None  # None: not checked yet
        self.carried = 0  # hashes changed by carry-overs (for tests and logs)

    async def cycle(
        self,
        redis: Any,
        subjects: list[str],
        now: datetime,
        tags: Mapping[str, str],
        batch: int = 5000,
        unreadable: dict[str, str] | None = None,
    ) -> int:
        """Carry every subject's v1 usage over; returns the Redis round trips made. A subject
        whose carry-over fails lands in ``unreadable`` (its v2 figures would be short); the
        others are carried all the same."""
        active = bool(await redis.exists(contract.V1_CONFIG_EPOCH))
        if active != self.active:
            log.info(
                "v1 counters %s",
                "found: carrying today's and this month's usage over to v2"
                if active
                else "absent: nothing to carry over",
            )
            self.active = active
        if not active:
            return 1
        trips = 1
        unreadable = unreadable if unreadable is not None else {}
        ttls = (contract.DAY_TTL_SECONDS, contract.MONTH_TTL_SECONDS)
        for start in range(0, len(subjects), batch):
            chunk = subjects[start : start + batch]
            pipe = redis.pipeline(transaction=False)
            for subject in chunk:
                for key in contract.v1_usage_keys(subject, now):
                    pipe.hgetall(key)
            replies = await pipe.execute()
            trips += 1
            pipe = redis.pipeline(transaction=False)
            calls: list[str] = []  # the subject of each EVAL, in order
            for i, subject in enumerate(chunk):
                v2_keys = contract.usage_keys(subject, now, tags.get(subject))
                for j in (0, 1):
                    v1 = {_text(k): _text(v) for k, v in (replies[2 * i + j] or {}).items()}
                    fields = [x for f in contract.CARRIED_FIELDS if f in v1 for x in (f, v1[f])]
                    if fields:
                        # EVAL, not EVALSHA: no script cache to keep loaded on every node (upgrade only)
                        pipe.eval(CARRY_OVER_LUA, 1, v2_keys[j], ttls[j], v1.get("last", "") if j == 0 else "", *fields)
                        calls.append(subject)
            if calls:
                # one damaged v1 hash fails its own EVAL only (a script error), not the batch
                for subject, result in zip(calls, await pipe.execute(raise_on_error=False)):
                    if isinstance(result, Exception):
                        unreadable[subject] = (
                            f"its usage counted under the v1 contract could not be carried over: {result}"
                        )
                    else:
                        self.carried += int(result)
                trips += 1
        return trips
