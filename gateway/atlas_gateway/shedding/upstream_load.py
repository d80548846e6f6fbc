"""Each upstream's own load, as vLLM reports it, read in the background (shedder.py sheds by it).

vLLM exports ``vllm:num_requests_running`` (sequences in the running batch) and
``vllm:num_requests_waiting`` (requests queued for a slot) on ``/metrics``. Every
``ATLAS_UPSTREAM_LOAD_SECONDS`` (default 1 s) one task reads that page of every upstream
(``upstream/targets.py``), one GET each, never per request: a request only looks at the last
reading of its upstream (``UpstreamQueue``), no clock, no I/O.

A queue that grows means the upstream is full: Sheddable requests are shed once its waiting
count reaches their threshold, then Standard, Critical last (thresholds per upstream, settings.py).
A reading is trusted for ``STALE_INTERVALS`` intervals; an upstream that answers no gauges, or
cannot be read, or whose reading went stale falls back to the in-flight ceilings (shedder.py),
with one log line when that starts and one when readings are back.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Awaitable, Callable
from urllib.parse import urlsplit, urlunsplit

from .. import metrics

log = logging.getLogger("atlas_gateway")

STALE_INTERVALS = 3
RUNNING = "vllm:num_requests_running"
WAITING = "vllm:num_requests_waiting"

# GET a URL -> its body (raises on a transport failure, a timeout or a non-200 answer)
Fetch = Callable[[str], Awaitable[bytes]]


class NoLoadExported(ValueError):
    """The page answered, but without vLLM's gauges: an upstream that exports nothing."""


def parse_load(text: str) -> tuple[float, float]:
    """(running, waiting) from a Prometheus text page, each summed over its label sets (one per
    model or engine of the server)."""
    running = waiting = None
    for line in text.splitlines():
        if not line.startswith("vllm:num_requests_"):
            continue
        name, _, rest = line.partition("{")
        if rest:
            rest = rest.rpartition("}")[2]
        else:
            name, _, rest = line.partition(" ")
        fields = rest.split()
        if not fields:
            continue
        try:
            value = float(fields[0])
        except ValueError:
            continue
        name = name.strip()
        if name == RUNNING:
            running = (running or 0.0) + value
        elif name == WAITING:
            waiting = (waiting or 0.0) + value
    if waiting is None:
        raise NoLoadExported(f"no {WAITING} on the page")
    return running or 0.0, waiting


def display_url(base: str) -> str:
    """The base URL without any user:password (metric labels and log lines never carry them)."""
    parts = urlsplit(base)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


class UpstreamQueue:
    """The last reading of one upstream, as the hot path sees it: ``fresh`` is kept by the
    reading task, so a request compares two integers and reads no clock."""

    __slots__ = ("base", "label", "limits", "read_metrics", "running", "waiting", "fresh", "read_at", "failing")

    def __init__(self, base: str, thresholds: tuple[int, int, int], read_metrics: bool = True) -> None:
        self.base = base
        self.label = display_url(base)
        # waiting requests at which a class is shed; <= 0: never by the queue
        self.limits = dict(zip(("Sheddable", "Standard", "Critical"), thresholds))
        self.read_metrics = read_metrics
        self.running = 0
        self.waiting = 0
        self.fresh = False  # False: the in-flight ceilings decide (shedder.py)
        self.read_at = float("-inf")
        self.failing: str | None = None  # why the last read failed, logged once per episode

    def sheds(self, priority: str) -> bool:
        limit = self.limits[priority]
        return 0 < limit <= self.waiting


class UpstreamLoad:
    """Reads every upstream's load on an interval; ``queue_for(base)`` is its last reading."""

    def __init__(self, queues: list[UpstreamQueue], fetch: Fetch, interval: float) -> None:
        self.queues = {q.base: q for q in queues}
        self.fetch = fetch
        self.interval = interval
        self._task: asyncio.Task | None = None

    def queue_for(self, base: str) -> UpstreamQueue | None:
        return self.queues.get(base)

    def start(self) -> None:
        if any(q.read_metrics for q in self.queues.values()):
            self._task = asyncio.ensure_future(self._run())

    async def read_all(self) -> None:
        """One round: every upstream read at once, each within one interval."""
        await asyncio.gather(*(self.read(q) for q in self.queues.values() if q.read_metrics))

    async def read(self, queue: UpstreamQueue) -> None:
        now = time.monotonic()
        try:
            # (a second at least: a loaded server's page may take that long, and a shorter interval
            # only means fresher readings)
            body = await asyncio.wait_for(self.fetch(queue.base + "/metrics"), max(self.interval, 1.0))
            running, waiting = parse_load(body.decode("utf-8", "replace"))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 (any failure to read means: no reading)
            self._failed(queue, now, exc)
            return
        queue.running, queue.waiting = int(running), int(waiting)
        queue.read_at = now
        queue.fresh = True
        metrics.UPSTREAM_LOAD.labels(queue.label, "running").set(queue.running)
        metrics.UPSTREAM_LOAD.labels(queue.label, "waiting").set(queue.waiting)
        metrics.UPSTREAM_LOAD_FRESH.labels(queue.label).set(1)
        if queue.failing is not None:
            log.warning(
                "upstream %s: load readable again (running %d, waiting %d): shedding by its queue",
                queue.label,
                queue.running,
                queue.waiting,
            )
            queue.failing = None

    def _failed(self, queue: UpstreamQueue, now: float, exc: Exception) -> None:
        metrics.UPSTREAM_LOAD_ERRORS.labels(queue.label).inc()
        if now - queue.read_at < STALE_INTERVALS * self.interval:
            return  # the last reading still stands
        queue.fresh = False
        metrics.UPSTREAM_LOAD_FRESH.labels(queue.label).set(0)
        if queue.failing is None:
            queue.failing = type(exc).__name__
            reason = str(exc) if isinstance(exc, NoLoadExported) else type(exc).__name__
            log.warning(
                "upstream %s: its load cannot be read from /metrics (%s): shedding by the in-flight "
                "ceilings (ATLAS_SHED_THRESHOLD*) until it can",
                queue.label,
                reason,
            )

    async def _run(self) -> None:
        while True:
            started = time.monotonic()
            try:
                await self.read_all()
            except Exception:  # noqa: BLE001 (the readings must outlive any one failure)
                log.exception("reading the upstreams' load failed")
            await asyncio.sleep(max(0.0, self.interval - (time.monotonic() - started)))

    async def stop(self) -> None:
        if self._task is None:
            return
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        self._task = None
