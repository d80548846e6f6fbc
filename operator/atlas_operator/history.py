"""Each subject's counter history, in memory and in Redis (so it survives an operator restart).

The write-back cycle already reads every subject's month counter; :meth:`History.observe` turns
that reading into a burn rate and, for the subjects whose counter moved and whose last sample
is at least a minute old, a sample to persist. A quiet subject never costs a Redis write (its
first reading is a baseline kept in memory only until its counter moves).
Histories are read from Redis once per subject (the first cycle that sees it), in pipelined
batches.
"""

from __future__ import annotations

from typing import Any, Iterable

from atlas_core import contract
from atlas_core.contract import HistorySample

from . import forecast


class History:
    def __init__(self) -> None:
        self.samples: dict[str, list[HistorySample]] = {}
        self._dirty: set[str] = set()  # subjects that gained a sample since the last flush

    async def load(self, redis: Any, subjects: Iterable[str], batch: int = 5000) -> int:
        """Read the stored history of every subject not seen yet; returns round trips made."""
        missing = [s for s in subjects if s not in self.samples]
        trips = 0
        for start in range(0, len(missing), batch):
            chunk = missing[start : start + batch]
            # GETs in a pipeline, not MGET: on a Redis Cluster the histories are in many slots
            pipe = redis.pipeline(transaction=False)
            for subject in chunk:
                pipe.get(contract.history_key(subject))
            replies = await pipe.execute()
            trips += 1
            for subject, raw in zip(chunk, replies):
                samples = contract.decode_history(raw)
                if samples:
                    forecast.thin(samples, samples[-1].at_ms)
                self.samples[subject] = samples
        return trips

    def observe(self, subject: str, at_ms: int, month: str, settled: int) -> forecast.BurnRate | None:
        """Record a reading; the burn rate it implies (None: too little history, or quiet)."""
        samples = self.samples.setdefault(subject, [])
        forecast.trim(samples, at_ms)
        reading = forecast.advance(samples, at_ms, month, settled)
        rate = forecast.burn_rate(samples, reading)
        if forecast.should_store(samples, reading):
            # A first sample (the baseline) stays in memory until the counter moves: quiet
            # subjects write nothing; an active one persists it with its first change.
            if samples:
                self._dirty.add(subject)
            samples.append(reading)
            forecast.thin(samples, at_ms)
        return rate

    @property
    def pending(self) -> int:
        """Subjects whose history waits for :meth:`flush`."""
        return len(self._dirty)

    def forget(self, live: set[str]) -> None:
        """Drop the in-memory history of subjects that no longer exist (their Redis list expires)."""
        for subject in [s for s in self.samples if s not in live]:
            del self.samples[subject]
            self._dirty.discard(subject)

    async def flush(self, redis: Any, batch: int = 5000) -> int:
        """Persist the histories that gained a sample since the last flush (one SET each);
        returns round trips made."""
        subjects, self._dirty = sorted(self._dirty), set()
        trips = 0
        for start in range(0, len(subjects), batch):
            pipe = redis.pipeline(transaction=False)
            for subject in subjects[start : start + batch]:
                pipe.set(
                    contract.history_key(subject),
                    contract.encode_history(self.samples.get(subject, ())),
                    ex=contract.HISTORY_TTL_SECONDS,
                )
            await pipe.execute()
            trips += 1
        return trips
