"""Metrics of a pod's several worker processes (ATLAS_WORKERS > 1), summed at scrape time.

prometheus_client's own multiprocess mode keeps every value in a memory-mapped file, updated
under a lock on every ``inc``: a fifth of a request's CPU (docs/benchmarks.md, "Figures behind
the code"). Here each worker keeps its metrics in memory exactly as a single process does and
writes a snapshot of them to ``<dir>/<pid>.json`` once a second (and when it stops); a scrape,
answered by whichever worker accepts it, adds up every worker's snapshot (its own values taken
live). So a scrape may be up to a second behind a worker's requests; nothing else changes.

Counters and histograms are summed over every snapshot, also those of workers that are gone
(a restarted worker starts from zero: its predecessor's counts must stay in the sum or the
counter would go down). Gauges are summed over live workers only (the few in
``metrics.MAX_OVER_WORKERS``: their largest value).
"""

from __future__ import annotations

import asyncio
import json
import os
from typing import Iterable

from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.core import Metric

from .metrics import MAX_OVER_WORKERS

PREFIX = "atlas_"  # only the gateway's own families; process_*/python_* stay per process
SNAPSHOT_INTERVAL = 1.0


def snapshot(registry: CollectorRegistry = REGISTRY) -> list:
    """[name, type, help, [[sample name, labels, value], ...]] per metric family."""
    out = []
    for family in registry.collect():
        if not family.name.startswith(PREFIX):
            continue
        samples = [[s.name, s.labels, s.value] for s in family.samples if not s.name.endswith("_created")]
        out.append([family.name, family.type, family.documentation, samples])
    return out


def write_snapshot(directory: str, pid: int | None = None) -> None:
    pid = os.getpid() if pid is None else pid
    path = os.path.join(directory, f"{pid}.json")
    with open(path + ".tmp", "w") as fh:
        json.dump(snapshot(), fh, separators=(",", ":"))
    os.replace(path + ".tmp", path)  # a reader never sees half a snapshot


async def keep_writing(directory: str) -> None:
    """This worker's part: a snapshot every SNAPSHOT_INTERVAL, until cancelled (then once more)."""
    try:
        while True:
            write_snapshot(directory)
            await asyncio.sleep(SNAPSHOT_INTERVAL)
    finally:
        write_snapshot(directory)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _snapshots(directory: str) -> Iterable[tuple[int, list]]:
    own = os.getpid()
    yield own, snapshot()  # this worker's values, live
    for name in os.listdir(directory):
        if not name.endswith(".json") or not name[:-5].isdigit() or int(name[:-5]) == own:
            continue
        try:
            with open(os.path.join(directory, name)) as fh:
                yield int(name[:-5]), json.load(fh)
        except (OSError, ValueError):
            continue  # removed or replaced meanwhile: the next scrape reads it


class WorkersCollector:
    """Every worker's snapshot, summed sample by sample."""

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def collect(self) -> Iterable[Metric]:
        families: dict[str, tuple[str, str, dict]] = {}
        for pid, families_of_worker in _snapshots(self.directory):
            live = None
            for name, kind, documentation, samples in families_of_worker:
                if kind == "gauge":
                    live = _alive(pid) if live is None else live
                    if not live:
                        continue
                _, _, values = families.setdefault(name, (kind, documentation, {}))
                largest = name in MAX_OVER_WORKERS
                for sample_name, labels, value in samples:
                    key = (sample_name, tuple(sorted(labels.items())))
                    before = values.get(key)
                    values[key] = value if before is None else (max(before, value) if largest else before + value)
        for name, (kind, documentation, values) in families.items():
            metric = Metric(name, documentation, kind)
            for (sample_name, labels), value in values.items():
                metric.add_sample(sample_name, dict(labels), value)
            yield metric


def render(directory: str) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(WorkersCollector(directory))
    return generate_latest(registry)
