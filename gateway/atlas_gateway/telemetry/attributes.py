"""What one finished request says about itself, in the two shapes telemetry exports: the server
span's attributes (OpenTelemetry's GenAI and HTTP semantic conventions, and Atlas's own under
``atlas.*``) and the usage record. Pure functions of the request record (request.py), called
only for a request that is recorded: never key material, only the AtlasKey's and AtlasQuota's
``namespace/name``.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from typing import Any

from atlas_core.contract import format_micro


def span_attributes(req) -> dict[str, Any]:
    """The server span's attributes once the request has ended."""
    attrs: dict[str, Any] = {
        "http.request.method": req.method,
        "http.route": req.route.path,
        "http.response.status_code": req.status,
        "gen_ai.operation.name": req.route.operation,
        "atlas.request.id": req.id,
    }
    model = req.doc.get("model") if isinstance(req.doc, dict) else None
    if isinstance(model, str):
        attrs["gen_ai.request.model"] = model
    principal = req.principal
    if principal is not None:
        attrs["atlas.key"] = principal.ref
        if principal.quota is not None:
            attrs["atlas.quota"] = principal.quota.ref
    if req.priority:
        attrs["atlas.priority"] = req.priority
    bound = req.bound
    if bound is not None:
        if bound.sequences:
            attrs["gen_ai.request.max_tokens"] = bound.cap
        attrs["atlas.tokens.prompt_bound"] = bound.prompt
    if req.reserve:
        attrs["atlas.tokens.reserved"] = req.reserve
    if req.shrunk:
        attrs["atlas.shrink"] = True
    if req.demoted:
        attrs["atlas.demoted"] = req.demoted
    if req.refused_by:
        attrs["atlas.refused.limit"], attrs["atlas.refused.by"] = req.refused_by
    ticket = req.ticket
    if ticket is not None:
        prompt, completion = _billed(req)
        attrs["gen_ai.usage.input_tokens"] = prompt
        attrs["gen_ai.usage.output_tokens"] = completion
        if req.cached:
            attrs["gen_ai.usage.cache_read.input_tokens"] = req.cached
        attrs["atlas.tokens.settled"] = prompt + completion
        if ticket.cost is not None:
            attrs["atlas.cost"] = format_micro(ticket.cost)
            attrs["atlas.cost.currency"] = ticket.currency
    elif req.fail_open:
        attrs["atlas.fail_open"] = True
    if req.response_model:
        attrs["gen_ai.response.model"] = req.response_model
    if req.error_type:
        attrs["error.type"] = req.error_type
    return attrs


def usage_record(req, trace_id: str | None) -> dict[str, Any]:
    """One settled request, for chargeback (docs/tracing.md lists the fields)."""
    ticket = req.ticket
    principal = ticket.principal
    prompt, completion = _billed(req)
    return {
        "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "requestId": req.id,
        "traceId": trace_id,
        "key": principal.ref,
        "quota": principal.quota.ref if principal.quota is not None else None,
        "model": req.doc.get("model") if isinstance(req.doc.get("model"), str) else None,
        "route": req.route.path,
        "status": req.status,
        "promptTokens": prompt,
        "completionTokens": completion,
        "cachedTokens": req.cached,
        "reservedTokens": ticket.reserved,
        "cost": format_micro(ticket.cost) if ticket.cost is not None else None,
        "currency": ticket.currency if ticket.cost is not None else None,
        "durationMs": round((time.perf_counter() - req.started) * 1000, 3),
    }


def _billed(req) -> tuple[int, int]:
    """(prompt, completion) charged; a request settled before its upstream call was charged nothing."""
    bill = req.billed
    return (bill.prompt, bill.completion) if bill is not None else (0, 0)


def client_trace_id(forward: dict[str, str]) -> str | None:
    """The trace id of the client's own ``traceparent`` (when the gateway records none itself)."""
    parent = forward.get("traceparent")
    if parent and len(parent) >= 55 and parent[2] == "-":
        trace_id = parent[3:35].lower()
        if trace_id != "0" * 32 and all(c in "0123456789abcdef" for c in trace_id):
            return trace_id
    return None
