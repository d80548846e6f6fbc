"""The gateway's long-lived state: Redis client, config cache, admission scripts, the shared
aiohttp session, the shedder and the Redis health tracker. One per process."""

from __future__ import annotations

import asyncio
import gc
import itertools
import logging
import os
import time

import aiohttp
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from atlas_core import cluster

from . import metrics, worker_metrics
from .auth.authenticator import Authenticator
from .auth.config_cache import ConfigCache
from .auth.identity_tokens import TokenAuthenticator
from .auth.response_owners import ResponseOwners
from .ledger.admission import Admission
from .ledger.recovery import Recovery
from .metering.bounds import Meter
from .settings import Settings
from .shedding.load_view import LoadView
from .shedding.shedder import Shedder
from .shedding.upstream_load import UpstreamLoad, UpstreamQueue, display_url
from .store.cluster import ClusterFastRedis
from .store.failover import MasterWatch
from .store.fastredis import FastRedis
from .telemetry import NO_TRACING, NO_USAGE_RECORDS, start_tracing, start_usage_records
from .upstream.headers import UpstreamHeaders
from .upstream.targets import Upstreams, normalize_base

log = logging.getLogger("atlas_gateway")


class RedisHealth:
    """Tracks Redis reachability for fail-open logging: one line when it goes away (then at most
    one every 10 s while requests keep passing unchecked) and one when it is back."""

    def __init__(self) -> None:
        self.degraded = False
        self._last_log = 0.0
        self._passed = 0

    def failed(self, fail_open: bool, exc: BaseException) -> None:
        now = time.monotonic()
        if fail_open:
            self._passed += 1
        if not self.degraded or now - self._last_log > 10:
            mode = "failing open: requests pass unchecked" if fail_open else "failing closed: answering 503"
            log.warning(
                "Redis unreachable (%s): %s; %d passed unchecked since the last report",
                type(exc).__name__,
                mode,
                self._passed,
            )
            self._last_log = now
            self._passed = 0
        self.degraded = True

    def ok(self) -> None:
        if self.degraded:
            self.degraded = False
            log.warning("Redis reachable again: enforcing limits")


def settle_heap(threshold: int) -> None:
    """Keep the collector off the tail (docs/benchmarks.md, issue 13, "The tail at c=16").

    After start-up the heap holds tens of thousands of container objects (aiohttp, redis-py,
    prometheus_client, uvicorn...) that live as long as the process; every full collection
    walked them all, pausing the event loop for tens of milliseconds a few times a minute under
    load. Frozen (gc.freeze), they are never walked again. The first threshold stays Python's
    700 by default: a much higher one (young collections ~never) cost CPU per request at
    concurrency 1 (garbage in cycles lingers, out of the caches) and gained nothing at 16.
    ``threshold`` 0: leave the collector alone."""
    if threshold <= 0:
        return
    gc.collect()
    gc.freeze()
    gc.set_threshold(threshold, 10, 10)


async def watch_loop_lag(interval: float = 0.1) -> None:
    """Observe how late a timer fires (atlas_gateway_event_loop_lag_seconds): ten timer
    callbacks a second, no per-request cost."""
    loop = asyncio.get_running_loop()
    while True:
        due = loop.time() + interval
        await asyncio.sleep(interval)
        metrics.LOOP_LAG.observe(max(0.0, loop.time() - due))


class Runtime:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.redis_cluster = settings.redis_cluster == "true"  # "auto" is resolved in start()
        self._id_prefix = os.urandom(6).hex() + "-"
        self.upstreams = Upstreams(settings.upstream_url, settings.upstream_models)
        self.meter = Meter.from_settings(settings)
        local, shared = settings.shed_limits()
        self.shedder = Shedder(*local, shared=shared, pool=settings.upstream_pool_size)
        self.upstream_load = UpstreamLoad(self._upstream_queues(), self._fetch_metrics, settings.upstream_load_interval)
        self._load_session: aiohttp.ClientSession | None = None
        self.redis_health = RedisHealth()
        metrics.INFLIGHT.set_function(lambda: self.shedder.inflight)  # read at scrape time
        self.session: aiohttp.ClientSession | None = None
        self._lag_watch: asyncio.Task | None = None
        self.loop: asyncio.AbstractEventLoop | None = None  # set by start()
        self._snapshots: asyncio.Task | None = None  # one of several workers: metrics for the others
        self._ids = itertools.count(1)
        self._connect_redis()
        self.upstream_headers = UpstreamHeaders.from_settings(settings)
        # traces and usage records: constant no-ops until start() (and after it, unless configured)
        self.tracing = NO_TRACING
        self.usage_records = NO_USAGE_RECORDS

    def _connect_redis(self) -> None:
        """The Redis clients (single Redis or Cluster) and what is built on them."""
        settings = self.settings
        # redis-py serves only idempotent commands here (config GETs, usage reads, the response
        # owner SET/DEL, the shed view's own field); scripts that reserve or settle go through
        # fastredis, never retried. So one immediate retry on a lost connection is safe, and it
        # is needed: after a Redis restart each pooled connection fails once (a /v1/usage 503
        # right after traffic had recovered). Timeouts are not retried (the wait would double).
        self.redis = cluster.redis_py_client(
            settings.redis_url,
            self.redis_cluster,
            socket_timeout=settings.redis_timeout,
            socket_connect_timeout=settings.redis_timeout,
            retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
            retry_on_timeout=False,
            health_check_interval=0,
            max_connections=1024,
        )
        self.cache = ConfigCache(self.redis, settings.config_ttl)
        # a token's binding is re-read as often as a key's config: a revoked one ends as fast
        tokens = TokenAuthenticator(self.redis, leeway=settings.token_leeway, recheck=settings.config_ttl)
        self.auth = Authenticator(self.cache, self.redis_health, settings.fail_open, tokens)
        self.response_owners = ResponseOwners(self.redis)
        self.fast_redis: FastRedis | ClusterFastRedis  # the hot path's client: the same calls either way
        if self.redis_cluster:
            self.fast_redis = ClusterFastRedis(
                settings.redis_url, settings.redis_timeout, settings.redis_cluster_wait_ms
            )
        else:
            self.fast_redis = FastRedis(settings.redis_url, settings.redis_timeout)
        self.admission = Admission(
            lease_ttl_seconds=settings.lease_ttl, fast=self.fast_redis, max_waiting=settings.redis_max_waiting
        )
        sentinel_mode = self.fast_redis.locator is not None
        self.recovery = Recovery(self.admission, replays=sentinel_mode)
        # Sentinel's failovers, watched (a Redis Cluster fails over by itself: store/cluster.py)
        self.master_watch: MasterWatch | None = None
        if isinstance(self.fast_redis, FastRedis):
            if sentinel_mode:
                self.fast_redis.on_master_change = self.recovery.replay_after_failover
            self.master_watch = MasterWatch(self.fast_redis, self.redis, settings.sentinel_check_interval)
        self.load_view = LoadView(self.redis, self.shedder, self._id_prefix, settings.shed_publish_interval)

    def _upstream_queues(self) -> list[UpstreamQueue]:
        """One load reading per upstream, with its queue thresholds (ATLAS_UPSTREAM_SHEDDING)."""
        s = self.settings
        own = {normalize_base(url): entry for url, entry in s.upstream_shedding.items()}
        reading = s.upstream_load_interval > 0
        queues = []
        for base in self.upstreams.all_bases():
            entry = own.get(base)
            queues.append(
                UpstreamQueue(base, s.queue_thresholds, reading)
                if entry is None
                else UpstreamQueue(base, entry.queue_thresholds, reading and entry.read_metrics)
            )
        for url in set(own) - {q.base for q in queues}:
            log.warning(
                "ATLAS_UPSTREAM_SHEDDING names %s, which is no upstream (ATLAS_UPSTREAM_URL, "
                "ATLAS_UPSTREAM_MODELS): ignored",
                display_url(url),
            )
        return queues

    async def _fetch_metrics(self, url: str) -> bytes:
        """GET an upstream's /metrics on a session of its own: a full request pool must not
        delay the reading that tells the upstream is full."""
        if self._load_session is None:
            self._load_session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=8, keepalive_timeout=self.settings.upstream_keepalive),
                headers={}
                if self.settings.upstream_api_key is None
                else {"Authorization": f"Bearer {self.settings.upstream_api_key}"},
            )
        async with self._load_session.get(url) as resp:
            if resp.status != 200:
                raise aiohttp.ClientResponseError(resp.request_info, (), status=resp.status)
            return await resp.read()

    def new_request_id(self) -> str:
        """Unique per request across gateways (random per-process prefix + counter): also the lease
        member in Redis, so it must never come from the client."""
        return f"{self._id_prefix}{next(self._ids)}"

    async def start(self) -> None:
        s = self.settings
        if s.redis_cluster == "auto" and await cluster.detect(s.redis_url, s.redis_timeout):
            await self.fast_redis.aclose()
            await self.redis.aclose()
            self.redis_cluster = True
            self._connect_redis()
        if self.redis_cluster:
            log.info("Redis Cluster mode: commands routed by slot")
        if self.master_watch is not None:
            self.master_watch.start()
        self.load_view.start()
        self.upstream_load.start()
        connector = aiohttp.TCPConnector(
            limit=s.upstream_pool_size, limit_per_host=0, keepalive_timeout=s.upstream_keepalive, ttl_dns_cache=60
        )
        self.session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=None, connect=s.upstream_connect_timeout, sock_read=s.upstream_timeout),
            auto_decompress=False,  # pass bodies through as they are; SSE from vLLM is not compressed
            skip_auto_headers=("User-Agent", "Accept-Encoding"),
        )
        self.tracing = start_tracing(s.telemetry)
        self.usage_records = start_usage_records(s.telemetry)
        self.loop = asyncio.get_running_loop()  # the hot path's, kept (see upstream/call.py)
        self._lag_watch = asyncio.ensure_future(watch_loop_lag())
        if s.metrics_dir:
            self._snapshots = asyncio.ensure_future(worker_metrics.keep_writing(s.metrics_dir))
        settle_heap(s.gc_threshold)  # last: everything start-up made is in the heap by now

    async def stop(self) -> None:
        if self._lag_watch is not None:
            self._lag_watch.cancel()
        if self._snapshots is not None:
            self._snapshots.cancel()  # (it writes a last snapshot)
            await asyncio.gather(self._snapshots, return_exceptions=True)
        # undo what timed-out calls may have left, while Redis still answers (bounded wait)
        if not await self.recovery.drain(2.0):
            log.warning(
                "%d unknown-outcome requests not undone at shutdown: their leases expire by ATLAS_LEASE_TTL_SECONDS",
                len(self.recovery.pending),
            )
        self.recovery.stop()
        if self.master_watch is not None:
            await self.master_watch.stop()
        await self.load_view.stop()
        await self.upstream_load.stop()
        if self._load_session is not None:
            await self._load_session.close()
            self._load_session = None
        if self.session is not None:
            await self.session.close()
            self.session = None
        await self.fast_redis.aclose()
        await self.redis.aclose()
        # last: what the requests above recorded leaves now (bounded: telemetry/otel_sdk.py)
        self.tracing.shutdown()
        self.usage_records.shutdown()
        self.tracing, self.usage_records = NO_TRACING, NO_USAGE_RECORDS
