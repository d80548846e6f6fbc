"""The hot path: every metered route (chat, completions, embeddings, responses, messages,
rerank, score) and the requests-only /tokenize and /detokenize, as raw ASGI.

Order of checks (cheapest first, nothing consumed before admission; the key is checked from
the headers before the body is read, so an unknown key costs no body):
method -> key present -> declared body size -> key lookup (cached) -> key usable -> body (within
ATLAS_BODY_TIMEOUT_SECONDS, see server.py) -> JSON/fields -> model allowed -> prompt bound
(tokens.py) -> shedding -> admission (1 Redis call) -> upstream (with the completion cap the
reservation was made for) -> settlement (1 Redis call).

Every admitted request is settled exactly once (``Ticket``), whatever ends it: a normal
response, an upstream error, a timeout, a client disconnect or a cancellation.
"""

from __future__ import annotations

import asyncio
import logging
import time
from time import perf_counter

import aiohttp

from atlas_core.contract import hash_api_key

from . import errors, metrics, owned_responses
from .admission import rejection
from .auth import Principal
from .calls import NO_COST, cost_args
from .faults import REDIS_FAILURES, is_transport_failure, maybe_ran, reply_error
from .headers import MISSING_KEY, RequestHeaders
from .identity_tokens import TokenRefused, looks_like_jwt
from .priority import effective_priority
from .responses import read_body, send_bytes, send_error
from .runtime import Runtime
from .streaming import StreamState, pump
from .tokens import Bound, text_tokens
from .upstream_body import UpstreamBody
from .usage import cached_tokens, response_id_from_body, split_usage, usage_from_body
from .validation import parse_body, validate

log = logging.getLogger("atlas_gateway")

_SSE_HEADERS = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache"),
                (b"x-accel-buffering", b"no")]
PATHS = {"chat": "/v1/chat/completions", "completions": "/v1/completions", "embeddings": "/v1/embeddings",
         "responses": "/v1/responses", "messages": "/v1/messages", "rerank": "/v1/rerank", "score": "/v1/score",
         "tokenize": "/tokenize", "detokenize": "/detokenize"}
_MAX_TOKENS_HEADER = b"x-atlas-max-tokens"


class Ticket:
    """One admitted request's reservation; ``settle`` runs at most once."""

    __slots__ = ("rt", "principal", "request_id", "reserved", "done", "prices", "model")

    def __init__(self, rt: Runtime, principal: Principal, request_id: str, reserved: int,
                 prices: tuple | None = None, model: str = "") -> None:
        self.rt = rt
        self.principal = principal
        self.request_id = request_id
        self.reserved = reserved
        self.done = False
        self.prices = prices  # per subject (Principal.prices_for); None: nothing is priced
        self.model = model

    async def settle(self, actual: int, prompt: int = 0, cached: int = 0) -> None:
        """``actual`` tokens, of which ``prompt`` were the prompt (``cached`` of those read
        from the upstream's cache): the split only matters for pricing."""
        if self.done:
            return
        self.done = True
        costs = NO_COST
        if self.prices is not None:
            prompt = min(prompt, actual)
            costs = cost_args(self.prices, prompt, actual - prompt, cached)
            if self.prices[0] is not None and costs[0] != b"0":
                metrics.count_cost(self.principal, self.model, int(costs[0]))
        try:
            # No asyncio.shield (it costs a task per request): the hot-path Redis client queues
            # the command synchronously before its first await, so a cancellation arriving now
            # still lets the settlement reach Redis. A failure is resolved by the recovery below.
            await self.rt.admission.settle(self.principal, self.request_id, self.reserved, actual, costs)
            if self.rt.recovery.replays:  # Sentinel: a failover may still lose this (recovery.py)
                self.rt.recovery.settled(self.principal, self.request_id, self.reserved, actual, costs)
        except REDIS_FAILURES as exc:
            if is_transport_failure(exc):
                metrics.count_redis_error("settle")
            else:
                reply_error("settle", exc)
            # whether it ran is unknown: undo.lua settles it once, when Redis answers again
            self.rt.recovery.settle_later(self.principal, self.request_id, self.reserved, actual, costs)


async def authenticate(rt: Runtime, api_key: str) -> Principal:
    """The Principal of a static key, or of the AtlasKey a workload identity token is bound to
    (identity_tokens.py); only hashes are looked up."""
    credential_hash = hash_api_key(api_key)
    token = looks_like_jwt(api_key)
    try:
        key_hash = credential_hash
        if token:
            try:
                key_hash = await rt.tokens.key_hash(api_key, credential_hash)
            except TokenRefused as refusal:
                # a Secret's key may look like a JWS: when it is no token of ours, it may be a key
                if not refusal.foreign or await rt.cache.lookup(credential_hash) is None:
                    raise
        principal = await rt.cache.lookup(key_hash)
    except TokenRefused as refusal:
        raise errors.GatewayError(refusal.status, refusal.message,
                                  "invalid_request_error" if refusal.status == 401 else "permission_error",
                                  refusal.code) from None
    except REDIS_FAILURES as exc:
        if not is_transport_failure(exc):
            raise reply_error("config", exc) from None
        metrics.count_redis_error("config")
        rt.redis_health.failed(rt.settings.fail_open, exc)
        key_hash = (rt.tokens.stale(credential_hash) if token else None) or credential_hash
        principal = rt.cache.stale(key_hash) if rt.settings.fail_open and key_hash else None
        if principal is None:
            raise errors.redis_unavailable() from None
    if principal is None:
        raise errors.invalid_api_key("Incorrect API key provided.")
    return principal


class RequestContext:
    """One inference request, from its headers to its settlement: what each step learnt, for the
    steps after it (and for the metrics, whichever step ends the request)."""

    __slots__ = ("rt", "kind", "path", "id", "started", "response_headers", "ref", "model", "priority",
                 "principal", "forward", "raw", "doc", "bound", "reserve", "ticket")

    def __init__(self, rt: Runtime, kind: str, path: str) -> None:
        self.rt = rt
        self.kind = kind  # route, a key of PATHS
        self.path = path
        self.started = perf_counter()
        self.id = rt.new_request_id()  # also the lease member in Redis: never from the client
        self.response_headers: list[tuple[bytes, bytes]] = [(b"x-request-id", self.id.encode())]
        # metric labels, filled in as they become known
        self.ref = ""
        self.model = ""
        self.priority = ""
        self.principal: Principal | None = None
        self.forward: dict[str, str] = {}  # request headers for the upstream
        self.raw = b""  # the client's body, as received
        self.doc: dict = {}  # ... and parsed
        self.bound: Bound | None = None  # prompt bound, completion cap, sequences (tokens.py)
        self.reserve = 0  # the tokens reserved (bound.reserve, or less when a Shrink budget lowered it)
        self.ticket: Ticket | None = None  # set once admitted (None: failing open, unmetered)

    @property
    def prompt_estimate(self) -> int:
        return self.bound.prompt


class InferenceEndpoint:
    """Raw ASGI endpoint for one route of :data:`PATHS`."""

    def __init__(self, gateway, kind: str) -> None:
        self.gateway = gateway  # holds .runtime once the lifespan has started
        self.kind = kind
        self.path = PATHS[kind]

    async def __call__(self, scope, receive, send) -> None:
        req = RequestContext(self.gateway.runtime, self.kind, self.path)
        try:
            await self._admit(req, scope, receive)
            try:
                await _UpstreamCall(req).run(scope, receive, send)
            finally:
                if req.ticket is not None and not req.ticket.done:  # a failure before the upstream call
                    await req.ticket.settle(0)
        except errors.GatewayError as err:
            await send_error(send, err, req.response_headers)
            metrics.count_request(req.ref, req.model, err.status, req.priority)
            metrics.count_rejection(req.ref, err.reason or err.code or err.type)
            metrics.OVERHEAD.observe(perf_counter() - req.started)
        except ConnectionAbortedError:
            return  # the client left while sending its body: nobody to answer
        except Exception:
            log.exception("unexpected error in %s", self.path)
            try:
                await send_error(send, errors.GatewayError(500, "Internal gateway error.", "server_error"),
                                 req.response_headers)
            except Exception:  # the response had already started: nothing more to say
                pass

    async def _admit(self, req: RequestContext, scope, receive) -> None:
        """Every check before the upstream call, then the admission: raises the GatewayError that
        refuses the request, or returns with ``req.ticket`` set (None only when failing open)."""
        rt = req.rt
        settings = rt.settings
        if scope["method"] != "POST":
            raise errors.method_not_allowed()
        headers = RequestHeaders(scope["headers"], forward=True)
        if headers.api_key is None:
            raise errors.invalid_api_key(MISSING_KEY)
        if headers.content_length > settings.max_body_bytes:
            raise errors.body_too_large(settings.max_body_bytes)
        # who is calling, from the headers alone: an unknown key's body is never read
        principal = req.principal = await authenticate(rt, headers.api_key)
        req.ref = principal.ref
        refusal = principal.refusal(time.time())
        if refusal is not None:
            raise refusal
        req.forward = headers.forward
        raw = await read_body(receive, settings.max_body_bytes)
        if raw is None:
            raise errors.body_too_large(settings.max_body_bytes)
        doc = parse_body(raw)
        req.raw, req.doc = raw, doc
        model = validate(self.kind, doc)
        req.model = metrics.model_label(model)
        if not principal.allows_model(model):
            raise errors.permission_denied(
                f"API key {principal.ref} may not use model '{model}'.", "model_not_allowed"
            )
        priority = req.priority = effective_priority(principal.priority, headers.priority)
        if rt.shedder.should_shed(priority):
            raise errors.shed()

        previous_tokens = 0
        if doc.get("previous_response_id") is not None:
            # continuing a stored response: only its creator may, and its tokens are re-fed
            previous_tokens = await owned_responses.tokens_of(rt, principal, doc["previous_response_id"])
        bound = req.bound = rt.meter.bound(self.kind, doc, previous_tokens)
        prompt_estimate = bound.prompt
        reserve = req.reserve = bound.reserve

        # the priced reservation: prompt bound at the input price plus cap x sequences at the output
        # price (a cost-limited key asking for an unpriced model is refused here, 403)
        prices = principal.prices_for(model)
        costs = NO_COST if prices is None else cost_args(prices, prompt_estimate, reserve - prompt_estimate)

        rt.shedder.admitting += 1  # counts towards shedding from now on (see Shedder)
        try:
            decision = await rt.admission.admit(principal, req.id, reserve, prompt_estimate, bound.sequences, costs)
        except REDIS_FAILURES as exc:
            if not is_transport_failure(exc):
                raise reply_error("admit", exc) from None
            metrics.count_redis_error("admit")
            if maybe_ran(exc):  # it may still run when Redis resumes: make that leave nothing
                rt.recovery.undo_admission(principal, req.id, reserve)
            rt.redis_health.failed(settings.fail_open, exc)
            if not settings.fail_open:
                raise errors.redis_unavailable() from None
            metrics.FAIL_OPEN.inc()
        else:
            if rt.redis_health.degraded:
                rt.redis_health.ok()
                rt.recovery.wake()
            req.response_headers += decision.headers
            if not decision.admitted:
                refused = rejection(decision, principal, reserve)
                metrics.count_refused(req.model, refused.reason or refused.code, reserve)
                raise refused
            if decision.reserved < reserve:  # a Shrink budget lowered the completion cap
                bound.cap = (decision.reserved - prompt_estimate) // bound.sequences
                reserve = req.reserve = decision.reserved
            req.ticket = Ticket(rt, principal, req.id, reserve, prices, req.model)
            metrics.count_admitted(req.model, reserve)
        finally:
            rt.shedder.admitting -= 1  # no await until _UpstreamCall.run counts it as in flight
        if bound.sequences:
            req.response_headers.append((_MAX_TOKENS_HEADER, str(bound.cap).encode()))


class _UpstreamCall:
    """Forward one admitted request and settle it, whatever happens."""

    __slots__ = ("req", "rt", "ticket", "upstream_seconds", "finishing", "client_gone", "billed", "cached",
                 "watcher", "_receive", "_task", "_refresher", "_refreshing", "owner")

    # A non-streaming request starts listening for a client disconnect only once it has been
    # upstream this long: the listener task costs ~60 us of CPU (about 40 % of the handler's
    # own work, measured), and a request that answers sooner has nothing worth aborting.
    WATCH_AFTER = 0.05

    def __init__(self, req: RequestContext) -> None:
        self.req = req
        self.rt = req.rt
        self.ticket = req.ticket
        self.upstream_seconds = 0.0
        self.finishing = False
        self.client_gone = False
        self.billed = (0, 0)  # (prompt, completion) charged at settlement
        self.cached = 0  # prompt tokens the upstream read from its cache (priced apart)
        self.watcher: asyncio.Future | None = None
        self._refresher: asyncio.TimerHandle | None = None
        self._refreshing: asyncio.Future | None = None
        # /v1/responses: the key subject a stored response belongs to
        self.owner = req.ticket.principal.subjects[0] if req.kind == "responses" and req.ticket is not None else None

    def _start_watcher(self) -> None:
        if not self.finishing and self.watcher is None:
            self.watcher = asyncio.ensure_future(self._watch_disconnect(self._receive, self._task))
            if self.ticket is not None and self.ticket.principal.leased:
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
        if interval > 0:
            self._refresher = self.rt.loop.call_later(interval, self._refresh_now)

    def _refresh_now(self) -> None:
        self._refresher = None
        if self.finishing or self.ticket is None or self.ticket.done:
            return
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = asyncio.ensure_future(self._refresh_leases())
        self._schedule_refresh()

    async def _refresh_leases(self) -> None:
        ticket = self.ticket
        try:
            await self.rt.admission.refresh(ticket.principal, ticket.request_id)
        except REDIS_FAILURES as exc:
            if is_transport_failure(exc):
                metrics.count_redis_error("refresh")  # the next attempt (TTL/3 later) may succeed
            else:
                reply_error("refresh", exc)

    async def _watch_disconnect(self, receive, task: asyncio.Task) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                if not self.finishing:
                    self.client_gone = True
                    task.cancel()
                return

    async def run(self, scope, receive, send) -> None:
        req = self.req
        rt = self.rt
        body = UpstreamBody(req.kind, req.doc, req.raw, req.bound.cap,
                            None if rt.settings.forward_priority is None else rt.settings.forward_priority[req.priority])
        streaming = body.streaming
        forward = req.forward
        forward["content-type"] = "application/json"
        forward["x-request-id"] = req.id
        if rt.upstream_auth:
            forward["authorization"] = rt.upstream_auth
        url = rt.upstreams.base_for(req.doc["model"]) + req.path

        shedder = rt.shedder
        loop = rt.loop  # (kept: on Python 3.11 each asyncio.get_running_loop() is a getpid() system call)
        self._receive = receive
        self._task = asyncio.current_task(loop)
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
                async with rt.session.post(url, data=body.payload, headers=forward) as resp:
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
                        if self.owner is not None and status == 200:
                            await self._record_owner(response_id_from_body(answer))
                        self._stop_watcher()
                        content_type = resp.headers.get("content-type", "application/json").encode("latin-1")
                        # answer first, settle right after (in finally): the client does not
                        # wait for the second Redis round trip; the lease is held until then
                        await send_bytes(send, status, answer, req.response_headers, content_type)
            except asyncio.CancelledError:
                if self.billed == (0, 0):
                    # cancelled before any answer (the client left, or the server is shutting
                    # down): the upstream has done the prefill
                    self.billed = (req.prompt_estimate, 0)
                if not self.client_gone:
                    raise
                asyncio.current_task().uncancel()
                status = 499  # client closed the request (nginx's convention), for metrics only
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
            await self._settle()
            metrics.count_request(req.ref, req.model, status, req.priority)
            metrics.count_tokens(req.ref, req.model, self.billed[0], self.billed[1])
            metrics.OVERHEAD.observe(max(0.0, perf_counter() - req.started - self.upstream_seconds))

    async def _settle(self) -> None:
        if self.ticket is not None:
            actual = self.billed[0] + self.billed[1]
            if actual > self.req.reserve:  # a misbehaving upstream: charged in full, and counted
                metrics.count_overrun(self.req.ref, actual - self.req.reserve)
            await self.ticket.settle(actual, self.billed[0], self.cached)

    async def _record_owner(self, response_id: str | None) -> None:
        if response_id:
            await owned_responses.record(self.rt, response_id, self.owner, self.billed[0] + self.billed[1])

    async def _fail(self, send, err: errors.GatewayError) -> None:
        self._stop_watcher()
        await send_error(send, err, self.req.response_headers)

    def _bill_body(self, status: int, body: bytes) -> tuple[int, int]:
        usage = usage_from_body(body)
        if usage is not None:
            prompt, completion, total = split_usage(usage)
            self.cached = cached_tokens(usage)
            return prompt, total - prompt
        if status != 200:
            return 0, 0  # the upstream refused it: nothing was generated
        # a 200 without usage: charge the prompt estimate and the body's size as completion
        req = self.req
        return req.prompt_estimate, min(text_tokens(body.decode("utf-8", "replace")),
                                        max(0, req.reserve - req.prompt_estimate))

    async def _stream(self, resp, send, strip_usage: bool) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": _SSE_HEADERS + self.req.response_headers})
        stream = StreamState(want_id=self.owner is not None)
        try:
            await pump(resp, send, stream, strip_usage)
        finally:
            cut = stream.error is not None or self.client_gone
            if stream.usage is not None:
                prompt, completion, total = split_usage(stream.usage)
                self.cached = cached_tokens(stream.usage)
                completion = total - prompt
                if cut:  # a running count (message_delta) may lag what was delivered
                    completion = max(completion, stream.delivered)
                self.billed = (prompt, completion)
            else:  # cut short, or an upstream that ignores include_usage: bill what was delivered
                self.billed = (self.req.prompt_estimate, stream.delivered)
            if cut:
                resp.close()  # abort the upstream request: never read (or pay for) the rest
        self._stop_watcher()
        if self.owner is not None:
            await self._record_owner(stream.response_id)
        await send({"type": "http.response.body", "body": b"", "more_body": False})
