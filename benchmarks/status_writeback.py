"""The usage write-back alone at 10,000 keys against the real API server: `python -m
benchmarks.status_writeback --keys 10000` (docs/benchmarks.md, "Status at scale").

Where `benchmarks.status_staleness` runs the whole operator (whose first reconcile of a fleet of
10,000 new keys, Secrets generated, takes far longer than the measurement on a shared 2-core
machine), this one creates the AtlasKeys with a reconciled status directly and runs the
operator's own write-back loop in-process: `usage.usage_cycle` every interval at a fixed rate,
with the operator's defaults (rate, burst, 8 writers on the official client), fed by a watch as
kopf's index would be. At T0 every key's usage changes in Redis at once; the staleness of a key
is T0 until its status shows it. Also: status patches per second and the CPU of kube-apiserver
and etcd meanwhile (/proc).

``--legacy`` runs the same loop the way the operator did before issue 19 (at most 500 patches per
cycle, most changed first). With ``PYTHONPATH=<old tree>/operator:.`` (an older tree from `git
archive <commit> operator | tar -x -C <old tree>`) it is the old code itself: its
``usage_cycle(max_writes=500)``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import inspect
import json
import os
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone

import redis.asyncio as aioredis

from atlas_core import contract
from atlas_devstack.controlplane import ControlPlane
from atlas_devstack.redis_server import RedisServer
from atlas_devstack.waiting import WaitTimeout, wait_for_async
from atlas_operator import usage
from atlas_operator.kube import ClientKubeApi
from atlas_operator.views import ObjectView

from . import operator_scale
from .procs import cpu_seconds
from .status_staleness import GROUP, VERSION, percentile

NAMESPACE = "fleet"


class Index:
    """The latest view of every AtlasKey, kept by a watch (what kopf's index gives the
    operator), and the first instant each showed ``tokensToday >= target``."""

    def __init__(self, api) -> None:
        from kubernetes import watch

        self.api, self.watch = api, watch
        self.views: dict[str, ObjectView] = {}
        self.target: int | None = None
        self.shown_at: dict[str, float] = {}
        self.events = 0
        self.stopped = False
        threading.Thread(target=self._run, daemon=True).start()

    def _see(self, obj: dict) -> None:
        view = ObjectView.of(obj)
        self.views[view.name] = view
        self.events += 1
        tokens = (view.status.get("usage") or {}).get("tokensToday", 0)
        if self.target is not None and tokens >= self.target and view.name not in self.shown_at:
            self.shown_at[view.name] = time.monotonic()

    def _run(self) -> None:
        rv = None
        while not self.stopped:
            try:
                if rv is None:
                    listed = self.api.list_namespaced_custom_object(GROUP, VERSION, NAMESPACE, "atlaskeys")
                    for obj in listed["items"]:
                        self._see(obj)
                    rv = listed["metadata"]["resourceVersion"]
                for event in self.watch.Watch().stream(
                    self.api.list_namespaced_custom_object,
                    GROUP,
                    VERSION,
                    NAMESPACE,
                    "atlaskeys",
                    resource_version=rv,
                    timeout_seconds=60,
                ):
                    rv = event["object"]["metadata"]["resourceVersion"]
                    if event["type"] in ("ADDED", "MODIFIED"):
                        self._see(event["object"])
            except Exception:  # noqa: BLE001 - 410 Gone or a dropped stream: list again
                rv = None


def create_fleet(kube: ClientKubeApi, n: int, now: datetime) -> None:
    zero, within = operator_scale.settled_status(now)
    kube.core.create_namespace({"metadata": {"name": NAMESPACE}})

    def one(i: int) -> None:
        kube.custom.create_namespaced_custom_object(
            GROUP,
            VERSION,
            NAMESPACE,
            "atlaskeys",
            {
                "apiVersion": f"{GROUP}/{VERSION}",
                "kind": "AtlasKey",
                "metadata": {"name": f"k{i}"},
                "spec": {"limits": {"tokensPerDay": 10**8}},
            },
        )
        kube.custom.patch_namespaced_custom_object_status(
            GROUP,
            VERSION,
            NAMESPACE,
            "atlaskeys",
            f"k{i}",
            {"status": {"observedGeneration": 1, "keyId": f"{i:08x}", "usage": zero, "conditions": within}},
            _content_type="application/merge-patch+json",
        )

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(one, range(n)))


async def run(n: int, legacy: bool, timeout: float, interval: float, rate: float | None) -> dict:
    from atlas_operator.settings import OperatorSettings

    settings = OperatorSettings.from_env()
    with ControlPlane(log=lambda m: None) as cp, RedisServer() as server:
        os.environ["KUBECONFIG"] = str(cp.kubeconfig)
        kube = ClientKubeApi.from_environment(workers=settings.api_workers)
        now = datetime.now(timezone.utc)
        t = time.monotonic()
        create_fleet(kube, n, now)
        print(f"created {n} AtlasKeys with a status in {time.monotonic() - t:.0f}s", flush=True)
        index = Index(kube.custom)
        await wait_for_async("the index to list the fleet", lambda: len(index.views) >= n, timeout, interval=0.5)
        redis = aioredis.from_url(server.url)
        params = inspect.signature(usage.usage_cycle).parameters
        paced = "bucket" in params and not legacy
        if paced:
            from atlas_operator.pacing import StalenessQueue, TokenBucket

            bucket = TokenBucket(rate or settings.status_writes_per_second, settings.status_write_burst)
            queue = StalenessQueue()
        label = ("paced %g/s, burst %d" % (bucket.qps, bucket.burst)) if paced else "at most 500 per cycle"

        async def cycle() -> usage.CycleStats:
            views = list(index.views.values())
            if paced:
                return await usage.usage_cycle(
                    redis,
                    kube,
                    views,
                    [],
                    datetime.now(timezone.utc),
                    bucket=bucket,
                    queue=queue,
                    deadline=time.monotonic() + interval,
                )
            if "max_writes" in params:
                return await usage.usage_cycle(redis, kube, views, [], datetime.now(timezone.utc), max_writes=500)
            # this tree, emulating the former cap: 500 tokens a cycle, none refilled meanwhile
            from atlas_operator.pacing import TokenBucket

            return await usage.usage_cycle(
                redis,
                kube,
                views,
                [],
                datetime.now(timezone.utc),
                bucket=TokenBucket(1e-9, 500),
                deadline=time.monotonic(),
            )

        pipe = redis.pipeline(transaction=False)
        for i in range(n):
            day_key, month_key = contract.usage_keys(contract.key_subject(NAMESPACE, f"k{i}"), now)
            pipe.hset(day_key, mapping={"settled": 10, "requests": 1})
            pipe.hset(month_key, mapping={"settled": 10})
        index.target = 10
        cpu = {name: cpu_seconds(p.pid) for name, p in cp.processes.items()}
        own = time.process_time()
        events = index.events
        t0 = time.monotonic()
        await pipe.execute()
        cycles = []
        while len(index.shown_at) < n and time.monotonic() - t0 < timeout:
            started = time.monotonic()
            stats = await cycle()
            cycles.append(
                (
                    round(started - t0, 1),
                    stats.patches,
                    stats.conflicts,
                    stats.deferred,
                    getattr(stats, "echo_pending", 0),
                )
            )
            print(
                f"  t={started - t0:6.1f}s patched {stats.patches} conflicts {stats.conflicts} deferred "
                f"{stats.deferred} shown {len(index.shown_at)}/{n}",
                flush=True,
            )
            if len(index.shown_at) >= n:
                break
            await asyncio.sleep(max(0.0, started + interval - time.monotonic()))
        with contextlib.suppress(WaitTimeout):  # the watch's last events; the figures say how many are missing
            await wait_for_async(
                "every status shown",
                lambda: len(index.shown_at) >= n,
                max(0.0, t0 + timeout - time.monotonic()),
                interval=0.1,
            )
        cpu = {name: cpu_seconds(p.pid) - cpu[name] for name, p in cp.processes.items()}
        own = time.process_time() - own
        stale = [s - t0 for s in index.shown_at.values()]
        writes = index.events - events
        last = max(stale)
        result = {
            "mode": label,
            "keys": n,
            "interval_s": interval,
            "shown": len(stale),
            "p50_s": round(percentile(stale, 50), 1),
            "p99_s": round(percentile(stale, 99), 1),
            "max_s": round(last, 1),
            "patches": writes,
            "patches_per_s": round(writes / last, 1),
            "apiserver_cpu_s": round(cpu["kube-apiserver"], 1),
            "etcd_cpu_s": round(cpu["etcd"], 1),
            "apiserver_ms_per_patch": round(1000 * cpu["kube-apiserver"] / max(1, writes), 2),
            "etcd_ms_per_patch": round(1000 * cpu["etcd"] / max(1, writes), 2),
            "apiserver_cores": round(cpu["kube-apiserver"] / last, 2),
            "client_cpu_ms_per_patch": round(1000 * own / max(1, writes), 2),
            "loadavg": [round(x, 1) for x in os.getloadavg()],
        }
        print(json.dumps(result), flush=True)
        index.stopped = True
        await redis.aclose()
        kube.close()
        return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, default=10000)
    parser.add_argument("--legacy", action="store_true", help="the former cap: 500 patches per cycle")
    parser.add_argument("--interval", type=float, default=10.0, help="the usage interval (operator default 10)")
    parser.add_argument("--rate", type=float, help="patches per second (default: the operator's)")
    parser.add_argument("--timeout", type=float, default=600.0)
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    asyncio.run(run(args.keys, args.legacy, args.timeout, args.interval, args.rate))


if __name__ == "__main__":
    main()
