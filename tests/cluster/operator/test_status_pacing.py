"""Status at scale (issue 19), with the real operator and kube-apiserver: a fleet of AtlasKeys
whose usage all changes at once, written at a low rate. Every key's status converges within the
bound the rate gives (interval + keys / rate), and no faster than the rate allows: the token
bucket, not the API server, paces the writes."""

from __future__ import annotations

import json
import threading
import time
from datetime import datetime, timezone

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from atlas_core import contract

from .procs import operator_proc, wait_until

# creating the fleet (its Secrets, Events, first statuses) takes minutes on a loaded machine
pytestmark = [pytest.mark.cluster, pytest.mark.timeout(900)]

KEYS_IN_FLEET = 300
RATE, BURST, INTERVAL = 15, 15, 2.0
GROUP, VERSION = "atlas.bugvanquisher.io", "v1alpha1"


class UsageWatch:
    """A watch on the namespace's AtlasKeys (a thread): when each key was first reconciled, and
    the instant of every status change showing ``tokensToday >= target``."""

    def __init__(self, kubeconfig, namespace: str) -> None:
        from kubernetes import client, config, watch

        self.api = client.CustomObjectsApi(config.new_client_from_config(str(kubeconfig)))
        self.watch, self.namespace = watch.Watch(), namespace
        self.reconciled: set[str] = set()
        self.target: int | None = None
        self.shown_at: dict[str, float] = {}
        self.stopped = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _see(self, obj: dict, now: float) -> None:
        status = obj.get("status") or {}
        name = obj["metadata"]["name"]
        if status.get("keyId"):
            self.reconciled.add(name)
        tokens = (status.get("usage") or {}).get("tokensToday", 0)
        if self.target is not None and tokens >= self.target:
            self.shown_at.setdefault(name, now)

    def _run(self) -> None:
        # a stream the API server ends (its timeout, a dropped connection) is listed and watched
        # again from where it was: a status missed here would fail the test for nothing
        rv = None
        while not self.stopped:
            try:
                if rv is None:
                    listed = self.api.list_namespaced_custom_object(GROUP, VERSION, self.namespace, "atlaskeys")
                    now = time.monotonic()
                    for obj in listed["items"]:
                        self._see(obj, now)
                    rv = listed["metadata"]["resourceVersion"]
                for event in self.watch.stream(
                    self.api.list_namespaced_custom_object,
                    GROUP,
                    VERSION,
                    self.namespace,
                    "atlaskeys",
                    resource_version=rv,
                    timeout_seconds=60,
                ):
                    rv = event["object"]["metadata"]["resourceVersion"]
                    if event["type"] in ("ADDED", "MODIFIED"):
                        self._see(event["object"], time.monotonic())
            except Exception:  # noqa: BLE001 - 410 Gone or a dropped stream: list again
                rv = None

    def stop(self) -> None:
        self.stopped = True
        self.watch.stop()


@pytest.fixture
def paced_operator(operator, operator_kubeconfig, op_redis, namespace, tmp_path):
    """This test's operator alone writes the namespace: the shared one is stopped meanwhile."""
    operator.stop()
    proc = operator_proc(operator_kubeconfig, op_redis.url, tmp_path / "operator.log")
    proc.env.update(
        {
            "ATLAS_NAMESPACES": namespace,
            "ATLAS_USAGE_INTERVAL_SECONDS": str(INTERVAL),
            "ATLAS_STATUS_WRITES_PER_SECOND": str(RATE),
            "ATLAS_STATUS_WRITE_BURST": str(BURST),
        }
    )
    try:
        yield proc
    finally:
        proc.stop()
        operator.start()


def write_back_idle(operator) -> bool:
    metrics = {
        family.name: family.samples[0].value
        for family in text_string_to_metric_families(httpx.get(operator.metrics_url, timeout=5).text)
        if family.name.startswith("atlas_operator_write_back") and family.samples
    }
    return (
        metrics.get("atlas_operator_write_back_patches") == 0 and metrics.get("atlas_operator_write_back_deferred") == 0
    )


def rss_mib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) // 1024 for line in status if line.startswith("VmRSS:"))


def fleet_manifest(n: int) -> str:
    items = [
        {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "AtlasQuota",
            "metadata": {"name": "team"},
            "spec": {"limits": {"tokensPerDay": 10**9}},
        }
    ]
    items += [
        {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "AtlasKey",
            "metadata": {"name": f"k{i}"},
            "spec": {"quotaRef": "team"},
        }
        for i in range(n)
    ]
    return json.dumps({"apiVersion": "v1", "kind": "List", "items": items})


def test_every_status_converges_within_the_bound_of_the_rate(kube, kubeconfig, namespace, paced_operator, redis_client):
    watch = UsageWatch(kubeconfig, namespace)
    try:
        kube("create", "-f", "-", input=fleet_manifest(KEYS_IN_FLEET))
        paced_operator.start()
        # first statuses come from the reconciles (not paced): every key gets its keyId
        wait_until("every key reconciled", lambda: len(watch.reconciled) == KEYS_IN_FLEET, timeout=300, interval=0.5)
        # the bound holds from an idle write-back (the fleet's first statuses written)
        wait_until("the write-back idle", lambda: write_back_idle(paced_operator), timeout=300, interval=INTERVAL)
        now = datetime.now(timezone.utc)
        pipe = redis_client.pipeline(transaction=False)
        for i in range(KEYS_IN_FLEET):
            day, month = contract.usage_keys(
                contract.key_subject(namespace, f"k{i}"), now, contract.slot_tag(namespace, f"k{i}", "team")
            )
            pipe.hset(day, mapping={"settled": 7, "requests": 1})
            pipe.hset(month, mapping={"settled": 7})
        watch.target = 7
        t0 = time.monotonic()
        pipe.execute()
        # the bound: the next cycle reads it (one interval), then keys / rate; plus an interval
        # of slack for a loaded machine and the watch's delivery
        bound = 2 * INTERVAL + KEYS_IN_FLEET / RATE + INTERVAL
        wait_until(
            "every status showing its usage",
            lambda: len(watch.shown_at) == KEYS_IN_FLEET,
            timeout=bound + 60,
            interval=0.2,
        )
        stale = sorted(t - t0 for t in watch.shown_at.values())
        print(
            f"\n[measure] {KEYS_IN_FLEET} keys at {RATE}/s: staleness p50 {stale[len(stale) // 2]:.1f}s "
            f"max {stale[-1]:.1f}s (bound {bound:.0f}s); operator RSS {rss_mib(paced_operator.proc.pid)} MiB"
        )
        assert stale[-1] <= bound, f"the last status took {stale[-1]:.1f}s, bound {bound:.0f}s"
        # ... and the rate held: in any window of T seconds at most BURST + RATE * T patches
        # (a small allowance for the watch delivering a few of them late together)
        for i, start in enumerate(stale):
            for j in range(i + BURST, len(stale), 25):
                assert j - i + 1 <= BURST + RATE * (stale[j] - start) + 5, (i, j, stale[j] - start)
        assert stale[-1] >= (KEYS_IN_FLEET - BURST) / RATE - 1
    finally:
        watch.stop()
