"""The process's own endpoints: ``/healthz`` (it answers), ``/readyz`` (its hot-path Redis client
answers) and ``/metrics``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .. import metrics, worker_metrics
from ..http.asgi import Headers, Scope, Send, send_bytes
from ..store.failures import REDIS_FAILURES, is_transport_failure, reply_kind
from .base import ServiceEndpoint

if TYPE_CHECKING:
    from ..runtime import Runtime


class HealthEndpoint(ServiceEndpoint):
    async def handle(self, rt: Runtime, scope: Scope, send: Send, headers: Headers) -> None:
        await send_bytes(send, 200, b"ok\n", headers, b"text/plain; charset=utf-8")


class ReadyEndpoint(ServiceEndpoint):
    """Ready when the hot-path Redis client (the one serving admissions) answers a PING; an
    error reply (NOAUTH, a wrong database...) is as unready as no connection at all."""

    async def handle(self, rt: Runtime, scope: Scope, send: Send, headers: Headers) -> None:
        try:
            await rt.fast_redis.ping()
        except REDIS_FAILURES as exc:
            if is_transport_failure(exc):
                metrics.count_redis_error("ping")
                body = b"redis unreachable\n"
            else:
                metrics.count_redis_reply_error("ping", reply_kind(exc))
                body = f"redis refused: {reply_kind(exc)}\n".encode()
            await send_bytes(send, 503, body, headers, b"text/plain; charset=utf-8")
            return
        await send_bytes(send, 200, b"ready\n", headers, b"text/plain; charset=utf-8")


class MetricsEndpoint(ServiceEndpoint):
    async def handle(self, rt: Runtime, scope: Scope, send: Send, headers: Headers) -> None:
        workers_dir = rt.settings.metrics_dir  # one of several workers: the sum of all of them
        body = worker_metrics.render(workers_dir) if workers_dir else metrics.render()
        await send_bytes(send, 200, body, headers, metrics.CONTENT_TYPE)
