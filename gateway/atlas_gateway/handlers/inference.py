"""The hot path: every metered route (chat, completions, embeddings, responses, messages,
rerank, score) and the requests-only /tokenize and /detokenize, as raw ASGI.

Order of checks (cheapest first, nothing consumed before admission; the key is checked from
the headers before the body is read, so an unknown key costs no body):
method -> key present -> declared body size -> key lookup (cached) -> key usable -> body (within
ATLAS_BODY_TIMEOUT_SECONDS, see server.py) -> JSON/fields -> model allowed -> shedding -> prompt
bound (metering/bounds.py) -> admission (1 Redis call) -> upstream (with the completion cap the
reservation was made for) -> settlement (1 Redis call).

Every admitted request is settled exactly once (ledger/ticket.py), whatever ends it: a normal
response, an upstream error, a timeout, a client disconnect or a cancellation; the upstream call
and what follows it are upstream/call.py's. What the route itself asks for (fields, caps,
streaming, prompt reader) is its row of the route table (routes.py).
"""

from __future__ import annotations

import logging
from time import perf_counter
from typing import TYPE_CHECKING

from .. import metrics
from ..http import errors
from ..http.asgi import Receive, Scope, Send, read_body, send_error
from ..http.headers import RequestHeaders
from ..ledger.admission import QueueFull, demotion_header, refusing_owner, rejection
from ..ledger.script_args import NO_COST, cost_args
from ..ledger.ticket import Ticket
from ..metering.validation import parse_body, validate
from ..request import RequestContext
from ..shedding.priority import SHEDDABLE, effective_priority
from ..store.failures import REDIS_FAILURES, is_transport_failure, maybe_ran, reply_error
from ..upstream.call import UpstreamCall

if TYPE_CHECKING:
    from ..app import Gateway
    from ..routes import Route

log = logging.getLogger("atlas_gateway")

_MAX_TOKENS_HEADER = b"x-atlas-max-tokens"
_INTERNAL_ERROR = errors.GatewayError(500, "Internal gateway error.", "server_error")


class InferenceEndpoint:
    """Raw ASGI endpoint for one metered or requests-only route of the route table."""

    def __init__(self, gateway: Gateway, route: Route) -> None:
        self.gateway = gateway  # holds .runtime once the lifespan has started
        self.route = route

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        rt = self.gateway.runtime
        assert rt is not None  # uvicorn serves requests only between the lifespan's startup and shutdown
        req = RequestContext(rt, self.route)
        try:
            await self._admit(req, scope, receive)
            try:
                await UpstreamCall(req).run(scope, receive, send)
            finally:
                if req.ticket is not None and not req.ticket.done:  # a failure before the upstream call
                    await req.ticket.settle(0)
        except errors.GatewayError as err:
            req.refused(err)
            await send_error(send, err, req.response_headers)
            metrics.count_request(req.ref, req.model, err.status, req.priority)
            metrics.count_rejection(req.ref, err.reason or err.code or err.type)
            metrics.observe_overhead(perf_counter() - req.started)
        except ConnectionAbortedError:  # the client left while sending its body: nobody to answer
            req.status, req.error = 499, "The client left while sending its body."
        except Exception:
            log.exception("unexpected error in %s", self.route.path)
            req.refused(_INTERNAL_ERROR)
            try:
                await send_error(send, _INTERNAL_ERROR, req.response_headers)
            except Exception:  # the response had already started: nothing more to say
                pass
        finally:
            req.trace.finish(req)
            if req.ticket is not None:
                rt.usage_records.emit(req)

    async def _admit(self, req: RequestContext, scope: Scope, receive: Receive) -> None:
        """Every check before the upstream call, then the admission: raises the GatewayError that
        refuses the request, or returns with ``req.ticket`` set (None only when failing open)."""
        rt = req.rt
        settings = rt.settings
        headers = RequestHeaders(scope["headers"], forward=True)
        req.forward = headers.forward
        req.method = scope["method"]
        req.trace = rt.tracing.start(req.forward, req.method, req.route, req.started)
        if req.method not in req.route.methods:
            raise errors.method_not_allowed()
        auth = rt.auth
        api_key = auth.presented(headers.api_key)
        if headers.content_length > settings.max_body_bytes:
            raise errors.body_too_large(settings.max_body_bytes)
        # who is calling, from the headers alone: an unknown key's body is never read
        principal = req.principal = await auth.identify(api_key)
        req.ref = principal.ref
        auth.check_usable(principal)
        raw = await read_body(receive, settings.max_body_bytes)
        if raw is None:
            raise errors.body_too_large(settings.max_body_bytes)
        doc = parse_body(raw)
        req.raw, req.doc = raw, doc
        model = validate(req.route, doc)
        req.model = metrics.model_label(model)
        if not principal.allows_model(model):
            raise errors.permission_denied(f"API key {principal.ref} may not use model '{model}'.", "model_not_allowed")
        priority = req.priority = effective_priority(principal.priority, headers.priority)
        queue = rt.upstream_load.queue_for(rt.upstreams.base_for(model))  # its last load reading
        if rt.shedder.should_shed(priority, queue):
            raise errors.shed()

        previous_tokens = 0
        if doc.get("previous_response_id") is not None:
            # continuing a stored response: only its creator may, and its tokens are re-fed
            previous_tokens = await rt.response_owners.tokens_of(principal, doc["previous_response_id"])
        bound = req.bound = rt.meter.bound(req.route, doc, previous_tokens)
        prompt_estimate = bound.prompt
        reserve = req.reserve = bound.reserve

        # the priced reservation: prompt bound at the input price plus cap x sequences at the output
        # price (a cost-limited key asking for an unpriced model is refused here, 403)
        prices = principal.prices_for(model)
        costs = NO_COST if prices is None else cost_args(prices, prompt_estimate, reserve - prompt_estimate)

        # a soft budget may demote the request to Sheddable in the admission itself: then it is
        # refused there if Sheddable requests are being shed now (writing nothing)
        shed_demoted = principal.soft_limited and priority != SHEDDABLE and rt.shedder.should_shed(SHEDDABLE, queue)
        rt.shedder.admitting += 1  # counts towards shedding from now on (see Shedder)
        span = req.trace.child("atlas.admission")
        failure = None
        try:
            decision = await rt.admission.admit(
                principal, req.id, reserve, prompt_estimate, bound.sequences, costs, shed_demoted
            )
        except QueueFull:
            failure = "admission queue full"
            raise errors.admissions_queued() from None
        except REDIS_FAILURES as exc:
            failure = f"Redis: {type(exc).__name__}"
            if not is_transport_failure(exc):
                raise reply_error("admit", exc) from None
            metrics.count_redis_error("admit")
            if maybe_ran(exc):  # it may still run when Redis resumes: make that leave nothing
                rt.recovery.undo_admission(principal, req.id, reserve)
            rt.redis_health.failed(settings.fail_open, exc)
            if not settings.fail_open:
                raise errors.redis_unavailable() from None
            metrics.FAIL_OPEN.inc()
            req.fail_open = True
        else:
            if rt.redis_health.degraded:
                rt.redis_health.ok()
                rt.recovery.wake()
            req.response_headers += decision.headers
            if decision.demoted is not None:  # past a soft budget: Sheddable from here on (the objective too)
                req.demoted = decision.demoted
                req.response_headers.append(demotion_header(decision, principal))
                if decision.admitted:
                    req.priority = SHEDDABLE
                    metrics.count_demoted(principal, decision)
            if not decision.admitted:
                refused = rejection(decision, principal, reserve)
                limit = refused.reason or refused.code or refused.type
                metrics.count_refused(req.model, limit, reserve)
                req.refused_by = (limit, refusing_owner(decision, principal))
                raise refused
            if decision.reserved < reserve:  # a Shrink budget lowered the completion cap
                bound.cap = (decision.reserved - prompt_estimate) // bound.sequences
                reserve = req.reserve = decision.reserved
                req.shrunk = True
            req.ticket = Ticket(rt.admission, rt.recovery, principal, req.id, reserve, prices, req.model)
            metrics.count_admitted(req.model, reserve)
        finally:
            rt.shedder.admitting -= 1  # no await until UpstreamCall.run counts it as in flight
            span.end(failure)
        if bound.sequences:
            req.response_headers.append((_MAX_TOKENS_HEADER, str(bound.cap).encode()))
