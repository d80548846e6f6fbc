"""The upstream call of one admitted request: forward it, pass the answer through (a body, or
server-sent events chunk by chunk), watch for the client leaving, keep the request's leases
alive while it lasts, bill what the upstream reports (or what was delivered) and settle the
ticket, whatever happens.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from time import perf_counter
from typing import TYPE_CHECKING

import aiohttp

from .. import metrics
from ..http import errors
from ..http.asgi import Receive, Scope, Send, send_bytes, send_error
from ..metering.body import UpstreamBody
from ..metering.bounds import text_tokens
from ..metering.events import StreamState
from ..metering.usage import cached_tokens, model_from_body, response_id_from_body, usage_from_body
from ..request import RequestContext
from ..store.failures import REDIS_FAILURES, is_transport_failure, reply_error
from .sse import pump

if TYPE_CHECKING:
    from ..ledger.ticket import Ticket


@dataclass(frozen=True, slots=True)
class Bill:
    """What a request is charged at settlement: prompt and completion tokens."""

    prompt: int
    completion: int

    @property
    def total(self) -> int:
        return self.prompt + self.completion


NOTHING = Bill(0, 0)

_SSE_HEADERS = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]


class UpstreamCall:
    """Forward one admitted request and settle it, whatever happens."""

    __slots__ = (
        "req",
        "rt",
        "ticket",
        "upstream_seconds",
        "finishing",
        "client_gone",
        "billed",
        "cached",
        "watcher",
        "_receive",
        "_task",
        "_refresher",
        "_refreshing",
        "owner",
    )

    # A non-streaming request starts listening for a client disconnect only once it has been
    # upstream this long: the listener task is a large share of the handler's own work
    # (docs/benchmarks.md, "Figures behind the code"), and a request that answers sooner has
    # nothing worth aborting.
    WATCH_AFTER = 0.05

    def __init__(self, req: RequestContext) -> None:
        self.req = req
        self.rt = req.rt
        self.ticket = req.ticket
        self.upstream_seconds = 0.0
        self.finishing = False
        self.client_gone = False
        self.billed = NOTHING
        self.cached = 0  # prompt tokens the upstream read from its cache (priced apart)
        self.watcher: asyncio.Future | None = None
        self._refresher: asyncio.TimerHandle | None = None
        self._refreshing: asyncio.Future | None = None
        # /v1/responses: the key subject a stored response belongs to
        self.owner = req.ticket.principal.subjects[0] if req.route.stores_responses and req.ticket is not None else None

    def _start_watcher(self) -> None:
        if not self.finishing and self.watcher is None:
            self.watcher = asyncio.ensure_future(self._watch_disconnect(self._receive, self._task))
            if self.ticket is not None and self.ticket.leased:
                self._schedule_refresh()

    def _stop_watcher(self) -> None:
        self.finishing = True
        if self.watcher is not None:
            self.watcher.cancel()
        if self._refresher is not None:
            self._refresher.cancel()
            self._refresher = None

    # Leases expire after ATLAS_LEASE_TTL_SECONDS (so a crashed gateway leaks nothing); a request
    # still upstream refreshes its own every TTL/3, one small script call. Scheduled only once
    # the request is long-lived (a stream, or a non-stream past WATCH_AFTER): no hot-path cost.
    def _schedule_refresh(self) -> None:
        interval = self.rt.admission.refresh_interval
        loop = self.rt.loop
        if interval > 0 and loop is not None:  # (the loop is set before any request: Runtime.start)
            self._refresher = loop.call_later(interval, self._refresh_now)

    def _refresh_now(self) -> None:
        self._refresher = None
        if self.finishing or self.ticket is None or self.ticket.done:
            return
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = asyncio.ensure_future(self._refresh_leases(self.ticket))
        self._schedule_refresh()

    async def _refresh_leases(self, ticket: Ticket) -> None:
        try:
            await self.rt.admission.refresh(ticket.principal, ticket.request_id)
        except REDIS_FAILURES as exc:
            if is_transport_failure(exc):
                metrics.count_redis_error("refresh")  # the next attempt (TTL/3 later) may succeed
            else:
                reply_error("refresh", exc)

    async def _watch_disconnect(self, receive: Receive, task: asyncio.Task) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                if not self.finishing:
                    self.client_gone = True
                    task.cancel()
                return

    async def run(self, scope: Scope, receive: Receive, send: Send) -> None:
        req = self.req
        rt = self.rt
        bound, principal, session, loop = req.bound, req.principal, rt.session, rt.loop
        # set before any upstream call: by the handler (bound, principal) and Runtime.start()
        assert bound is not None and principal is not None and session is not None and loop is not None
        body = UpstreamBody(
            req.route,
            req.doc,
            req.raw,
            bound.cap,
            None if rt.settings.forward_priority is None else rt.settings.forward_priority[req.priority],
        )
        streaming = body.streaming
        span = req.trace.upstream(req.doc["model"])  # the upstream call's span, if traced
        forward = rt.upstream_headers.stamp(req.forward, req.id, req.priority, principal.fairness_id, span.traceparent)
        forward["content-type"] = "application/json"
        url = rt.upstreams.base_for(req.doc["model"]) + req.route.path

        shedder = rt.shedder
        # (rt.loop, kept: on Python 3.11 each asyncio.get_running_loop() is a getpid() system call)
        task = asyncio.current_task(loop)
        assert task is not None  # a coroutine of the server's request task
        self._receive, self._task = receive, task
        if streaming:
            self._start_watcher()
            timer = None
        else:
            timer = loop.call_later(self.WATCH_AFTER, self._start_watcher)
        shedder.inflight += 1
        metrics.upstream_started(req.model)
        status = 0
        try:
            t_up = perf_counter()
            try:
                async with session.post(url, data=body.payload, headers=forward) as resp:
                    if streaming and resp.status == 200:
                        metrics.observe_upstream(req.model, perf_counter() - t_up)
                        status = 200
                        await self._stream(resp, send, body.strip_usage)
                        self.upstream_seconds = perf_counter() - t_up
                    else:
                        answer = await resp.read()
                        self.upstream_seconds = perf_counter() - t_up
                        metrics.observe_upstream(req.model, self.upstream_seconds)
                        status = resp.status
                        self.billed = self._bill_body(status, answer)
                        if req.trace.recording:
                            req.response_model = model_from_body(answer)
                        if self.owner is not None and status == 200:
                            await self._record_owner(response_id_from_body(answer))
                        self._stop_watcher()
                        content_type = resp.headers.get("content-type", "application/json").encode("latin-1")
                        # answer first, settle right after (in finally): the client does not
                        # wait for the second Redis round trip; the lease is held until then
                        await send_bytes(send, status, answer, req.response_headers, content_type)
            except asyncio.CancelledError:
                if self.billed == NOTHING:
                    # cancelled before any answer (the client left, or the server is shutting
                    # down): the upstream has done the prefill
                    self.billed = Bill(req.prompt_estimate, 0)
                if not self.client_gone:
                    raise
                task.uncancel()
                status = 499  # client closed the request (nginx's convention), for metrics only
                req.error = "The client left before the answer ended."
            except asyncio.TimeoutError:
                status = 504
                await self._fail(send, errors.upstream_timeout())
            except aiohttp.ClientError as exc:
                status = 502
                await self._fail(send, errors.upstream_unreachable(type(exc).__name__))
        finally:
            if timer is not None:
                timer.cancel()
            self._stop_watcher()
            shedder.inflight -= 1
            metrics.upstream_finished(req.model)
            req.status, req.billed, req.cached = status, self.billed, self.cached
            if status >= 400 and req.error is None:
                req.error = f"The upstream answered {status}."
            span.end(req.error if status >= 400 or not status else None)
            await self._settle()
            metrics.count_request(req.ref, req.model, status, req.priority)
            metrics.count_tokens(req.ref, req.model, self.billed.prompt, self.billed.completion)
            metrics.observe_overhead(max(0.0, perf_counter() - req.started - self.upstream_seconds))

    async def _settle(self) -> None:
        if self.ticket is not None:
            actual = self.billed.total
            if actual > self.req.reserve:  # a misbehaving upstream: charged in full, and counted
                metrics.count_overrun(self.req.ref, actual - self.req.reserve)
            span = self.req.trace.child("atlas.settlement")
            await self.ticket.settle(actual, self.billed.prompt, self.cached)
            span.end()

    async def _record_owner(self, response_id: str | None) -> None:
        if response_id and self.owner is not None:
            await self.rt.response_owners.record(response_id, self.owner, self.billed.total)

    async def _fail(self, send: Send, err: errors.GatewayError) -> None:
        self.req.refused(err)
        self._stop_watcher()
        await send_error(send, err, self.req.response_headers)

    def _bill_body(self, status: int, body: bytes) -> Bill:
        usage = usage_from_body(body)
        if usage is not None:
            prompt, completion, total = self.req.route.usage(usage)
            self.cached = cached_tokens(usage)
            return Bill(prompt, total - prompt)
        if status != 200:
            return NOTHING  # the upstream refused it: nothing was generated
        # a 200 without usage: charge the prompt estimate and the body's size as completion
        req = self.req
        return Bill(
            req.prompt_estimate,
            min(text_tokens(body.decode("utf-8", "replace")), max(0, req.reserve - req.prompt_estimate)),
        )

    async def _stream(self, resp: aiohttp.ClientResponse, send: Send, strip_usage: bool) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": _SSE_HEADERS + self.req.response_headers})
        stream = StreamState(want_id=self.owner is not None)
        try:
            await pump(resp, send, stream, strip_usage)
        finally:
            cut = stream.error is not None or self.client_gone
            if stream.usage is not None:
                prompt, completion, total = self.req.route.usage(stream.usage)
                self.cached = cached_tokens(stream.usage)
                completion = total - prompt
                if cut:  # a running count (message_delta) may lag what was delivered
                    completion = max(completion, stream.delivered)
                self.billed = Bill(prompt, completion)
                self.req.response_model = stream.model
            else:  # cut short, or an upstream that ignores include_usage: bill what was delivered
                self.billed = Bill(self.req.prompt_estimate, stream.delivered)
            if cut:
                resp.close()  # abort the upstream request: never read (or pay for) the rest
        self._stop_watcher()
        if self.owner is not None:
            await self._record_owner(stream.response_id)
        await send({"type": "http.response.body", "body": b"", "more_body": False})
