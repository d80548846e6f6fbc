"""Measure the usage write-back cycle at scale: `python -m benchmarks.operator_scale --keys 10000`
(and with `--latency N`: apply-to-working-key and delete-to-refused through the dev stack).

A real redis-server (atlas_devstack.redis_server) holds the counters; the Kubernetes API is
either a counting in-memory fake (default: isolates the operator's own cost) or, with
`--kubeconfig`, the real API server holding that many AtlasKeys (created by this script in a
fresh namespace). Prints time per cycle and API writes per cycle for: an idle cycle (nothing
changed), 1% of keys active, and every key active. Forecasting (burn-rate history,
status.forecast) is on, as in the operator, unless `--no-forecast`; each cycle is then taken a
minute after the previous one, so every active subject also stores a history sample (the
cycle's most expensive case).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from datetime import datetime, timedelta, timezone

import redis.asyncio as aioredis

from atlas_core import contract
from atlas_devstack.merge_patch import merge_patch
from atlas_operator.history import History
from atlas_operator.kube import PATCHED
from atlas_operator.pacing import StalenessQueue, TokenBucket
from atlas_operator.usage import usage_cycle
from atlas_operator.views import ObjectView


class CountingKube:
    """patch_status that only counts, and remembers the patches for the next cycle's views."""

    def __init__(self) -> None:
        self.writes = 0
        self.patched: dict[str, dict] = {}

    async def patch_status(self, plural, namespace, name, status, resource_version=None):
        self.writes += 1
        self.patched[name] = merge_patch(self.patched.get(name, {}), status)
        return PATCHED

    async def post_event(self, plural, obj, type_, reason, message):
        self.writes += 1


def settled_status(now: datetime) -> tuple[dict, list[dict]]:
    """A reconciled object's status parts with nothing used yet: its zero usage of today and this
    month, and the condition saying no budget is spent (what the write-back starts from)."""
    zero = contract.Usage(day=contract.day_of(now), month=contract.month_of(now)).to_status()
    within = [
        {
            "type": "QuotaExhausted",
            "status": "False",
            "reason": "WithinBudget",
            "message": "no day or month budget is spent",
            "lastTransitionTime": "2026-01-01T00:00:00Z",
            "observedGeneration": 1,
        }
    ]
    return zero, within


def make_views(n_keys: int, n_quotas: int, now: datetime) -> tuple[list[ObjectView], list[ObjectView]]:
    zero, within = settled_status(now)
    quotas = [
        ObjectView(
            "bench",
            f"q{i}",
            "1",
            1,
            {"limits": {"tokensPerDay": 10**9}},
            {"usage": zero, "keys": n_keys // n_quotas, "conditions": within, "observedGeneration": 1},
            False,
        )
        for i in range(n_quotas)
    ]
    keys = [
        ObjectView(
            "bench",
            f"k{i}",
            "1",
            1,
            {"quotaRef": f"q{i % n_quotas}", "limits": {"tokensPerDay": 10**8}},
            {"usage": zero, "conditions": within, "observedGeneration": 1},
            False,
        )
        for i in range(n_keys)
    ]
    return keys, quotas


def apply_patches_to_views(views: list[ObjectView], kube: CountingKube) -> list[ObjectView]:
    """What the watch would deliver after the cycle: views whose status carries the patches."""
    out = []
    for v in views:
        patch = kube.patched.pop(v.name, None)
        if patch is None:
            out.append(v)
            continue
        status = merge_patch(v.status, patch)
        out.append(ObjectView(v.namespace, v.name, v.resource_version, v.generation, v.spec, status, False))
    return out


def quota_tags(keys: list[ObjectView]) -> dict[str, str]:
    """Each key's counters live under its quota's slot tag, as the gateway writes them."""
    return {contract.key_subject(k.namespace, k.name): contract.slot_tag(k.namespace, k.name, k.quota) for k in keys}


async def traffic(redis, subjects: list[str], now: datetime, tokens: int, tags: dict[str, str]) -> None:
    pipe = redis.pipeline(transaction=False)
    for s in subjects:
        day_key, month_key = contract.usage_keys(s, now, tags.get(s))
        pipe.hincrby(day_key, contract.USAGE_SETTLED, tokens)
        pipe.hincrby(day_key, contract.USAGE_REQUESTS, 1)
        pipe.hset(day_key, contract.USAGE_LAST, int(now.timestamp() * 1000))
        pipe.hincrby(month_key, contract.USAGE_SETTLED, tokens)
    await pipe.execute()


async def run_fake(n_keys: int, n_quotas: int, redis_url: str, forecasting: bool = True) -> None:
    redis = aioredis.from_url(redis_url)
    # Mid-day, so that a minute per cycle never crosses midnight during the run.
    now = datetime.now(timezone.utc).replace(hour=12, minute=0, second=0, microsecond=0)
    keys, quotas = make_views(n_keys, n_quotas, now)
    kube = CountingKube()
    history = History() if forecasting else None
    print(
        f"{n_keys} keys, {n_quotas} quotas, real redis-server, counting fake API, "
        f"forecasting {'on' if forecasting else 'off'}"
    )

    async def cycle(label: str) -> None:
        nonlocal keys, quotas, now
        before = kube.writes
        stats = await usage_cycle(redis, kube, keys, quotas, now, history=history)
        print(
            f"  {label:<26} {stats.seconds * 1000:7.0f} ms/cycle  (usage read {stats.read_seconds * 1000:.0f} ms, "
            f"diff+forecast {stats.plan_seconds * 1000:.0f} ms, history I/O {stats.history_seconds * 1000:.0f} ms, "
            f"{stats.redis_round_trips} round trips)  API writes: {kube.writes - before}  "
            f"forecasts: {stats.forecasts}  histories written: {stats.history_writes}"
        )
        keys = apply_patches_to_views(keys, kube)
        quotas = apply_patches_to_views(quotas, kube)
        now += timedelta(seconds=61 if forecasting else 0)

    all_keys = [contract.key_subject("bench", k.name) for k in keys]
    all_quotas = [contract.quota_subject("bench", q.name) for q in quotas]
    await cycle("idle (first: loads history)")
    await cycle("idle (nothing changed)")
    active = [contract.key_subject("bench", f"k{i}") for i in range(0, n_keys, 100)]
    tags = quota_tags(keys)
    await traffic(redis, active + all_quotas, now, 10, tags)
    await cycle("1% of keys active")
    await traffic(redis, all_keys + all_quotas, now, 10, tags)
    await cycle("every key active")
    await traffic(redis, all_keys + all_quotas, now, 10, tags)
    await cycle("every key active again")
    await traffic(redis, all_keys + all_quotas, now, 10, tags)
    await cycle("every key, 3rd minute")
    await cycle("idle after traffic")
    await redis.aclose()


async def run_real(n_keys: int, n_quotas: int, redis_url: str, kubeconfig: str, reuse: str | None) -> None:
    from atlas_operator.kube import ClientKubeApi
    from atlas_operator.settings import GROUP, KEYS, QUOTAS, VERSION, OperatorSettings

    settings = OperatorSettings()

    os.environ["KUBECONFIG"] = kubeconfig
    api = ClientKubeApi.from_environment(workers=8)
    namespace = reuse or f"bench-{int(time.time())}"
    if not reuse:
        api.core.create_namespace({"metadata": {"name": namespace}})
    print(f"creating {n_keys} AtlasKeys and {n_quotas} AtlasQuotas in {namespace} (real API server) ...")
    t0 = time.perf_counter()
    now = datetime.now(timezone.utc)
    zero, within = settled_status(now)

    async def create(plural: str, name: str, spec: dict) -> None:
        await api._run(
            api.custom.create_namespaced_custom_object,
            GROUP,
            VERSION,
            namespace,
            plural,
            {
                "apiVersion": f"{GROUP}/{VERSION}",
                "kind": "AtlasKey" if plural == KEYS else "AtlasQuota",
                "metadata": {"name": name},
                "spec": spec,
            },
        )
        status = {"usage": zero, "conditions": within, "observedGeneration": 1}
        if plural == QUOTAS:
            status["keys"] = n_keys // n_quotas
        await api.patch_status(plural, namespace, name, status)

    gate = asyncio.Semaphore(16)

    async def bounded(*a):
        async with gate:
            await create(*a)

    if not reuse:
        await asyncio.gather(*(bounded(QUOTAS, f"q{i}", {"limits": {"tokensPerDay": 10**9}}) for i in range(n_quotas)))
        await asyncio.gather(
            *(
                bounded(KEYS, f"k{i}", {"quotaRef": f"q{i % n_quotas}", "limits": {"tokensPerDay": 10**8}})
                for i in range(n_keys)
            )
        )
        print(f"  created in {time.perf_counter() - t0:.1f}s")

    async def views():
        out = {}
        for plural in (KEYS, QUOTAS):
            items = (await api._run(api.custom.list_namespaced_custom_object, GROUP, VERSION, namespace, plural))[
                "items"
            ]
            out[plural] = [ObjectView.of(i) for i in items]
        return out[KEYS], out[QUOTAS]

    redis = aioredis.from_url(redis_url)

    queue = StalenessQueue()

    async def cycle(label: str, paced: bool = False) -> None:
        keys, quotas = await views()
        before = api.writes
        # paced: one cycle of the operator's defaults (its rate, until the next cycle is due)
        bucket = TokenBucket(settings.status_writes_per_second, settings.status_write_burst) if paced else None
        deadline = time.monotonic() + settings.usage_interval if paced else None
        stats = await usage_cycle(redis, api, keys, quotas, now, bucket=bucket, queue=queue, deadline=deadline)
        print(
            f"  {label:<30} {stats.seconds * 1000:8.1f} ms/cycle  (redis read {stats.read_seconds * 1000:.1f} ms)"
            f"  API writes: {api.writes - before} (conflicts {stats.conflicts}, deferred {stats.deferred})"
        )

    print(f"{n_keys} keys, {n_quotas} quotas, real redis-server, real kube-apiserver")
    if reuse:
        await cycle("settle leftovers (uncapped)")
    await cycle("idle (nothing changed)")
    tags = quota_tags((await views())[0])
    await traffic(
        redis,
        [contract.key_subject(namespace, f"k{i}") for i in range(0, n_keys, 100)]
        + [contract.quota_subject(namespace, f"q{i}") for i in range(n_quotas)],
        now,
        10,
        tags,
    )
    await cycle("1% of keys active")
    await traffic(redis, [contract.key_subject(namespace, f"k{i}") for i in range(n_keys)], now, 10, tags)
    rate = f"{settings.status_writes_per_second:g}/s for {settings.usage_interval:g}s"
    await cycle(f"every key active, {rate}", paced=True)
    await cycle(f"next cycle, {rate}", paced=True)
    if os.environ.get("ATLAS_MEASURE_UNCAPPED"):
        await cycle("every key active, no cap")
        await cycle("idle after traffic")
    await redis.aclose()
    api.close()


def run_latency(samples: int) -> None:
    """apply -> first 200 and delete -> first 401 through the whole dev stack (temp state dir)."""
    import base64
    import json
    import statistics
    import tempfile

    from atlas_devstack.stack import DevStack
    from atlas_devstack.waiting import wait_for

    with tempfile.TemporaryDirectory() as tmp, DevStack(tmp, upstream_url="", log=lambda m: None) as stack:
        kubectl = stack.control_plane.kubectl
        url = stack.env["ATLAS_GATEWAY_URL"]
        applied, deleted = [], []
        for i in range(samples):
            name = f"latency-{i}"
            manifest = json.dumps(
                {
                    "apiVersion": "atlas.bugvanquisher.io/v1alpha1",
                    "kind": "AtlasKey",
                    "metadata": {"name": name},
                    "spec": {},
                }
            )
            started = time.monotonic()
            kubectl("apply", "-f", "-", input=manifest)

            def key():
                res = kubectl("get", "secret", f"{name}-api-key", "-o", "jsonpath={.data.api-key}", check=False)  # noqa: B023 (run in this iteration)
                return res.returncode == 0 and res.stdout and base64.b64decode(res.stdout).decode()

            value = wait_for("secret", key, 30, interval=0.02, retry=(Exception,))
            wait_for("accepted", lambda: DevStack.chat(url, value)[0] == 200, 30, interval=0.02, retry=(Exception,))  # noqa: B023 (run in this iteration)
            applied.append(time.monotonic() - started)
            started = time.monotonic()
            kubectl("delete", "atlaskey", name, "--wait=false")
            wait_for("refused", lambda: DevStack.chat(url, value)[0] == 401, 30, interval=0.02, retry=(Exception,))  # noqa: B023 (run in this iteration)
            deleted.append(time.monotonic() - started)

        def show(label: str, xs: list[float]) -> None:
            print(
                f"  {label:<26} median {statistics.median(xs) * 1000:6.0f} ms   "
                f"min {min(xs) * 1000:6.0f} ms   max {max(xs) * 1000:6.0f} ms   (n={len(xs)})"
            )

        print("latency through the dev stack (kubectl -> operator -> Redis -> gateway):")
        show("apply -> key works", applied)
        show("delete -> key refused", deleted)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, default=10000)
    parser.add_argument("--quotas", type=int, default=100)
    parser.add_argument("--kubeconfig", help="measure against this API server instead of the fake")
    parser.add_argument("--reuse", metavar="NAMESPACE", help="with --kubeconfig: objects already created there")
    parser.add_argument("--no-forecast", action="store_true", help="the write-back without forecasting")
    parser.add_argument(
        "--latency",
        type=int,
        metavar="N",
        help="instead: N samples of apply->working and delete->refused via the dev stack",
    )
    args = parser.parse_args()
    if args.latency:
        run_latency(args.latency)
        return
    from atlas_devstack.redis_server import RedisServer

    with RedisServer() as server:
        if args.kubeconfig:
            asyncio.run(run_real(args.keys, args.quotas, server.url, args.kubeconfig, args.reuse))
        else:
            asyncio.run(run_fake(args.keys, args.quotas, server.url, forecasting=not args.no_forecast))


if __name__ == "__main__":
    main()
