"""The headers of every request Atlas sends upstream, stamped in one place: the inference call,
``/v1/models`` and the stored responses all pass theirs through :func:`stamp`.

What a client may pass on was chosen when its headers were read (http/headers.py: hop-by-hop
headers, its Atlas key and Atlas's own controls never are); here Atlas adds its request id
and the upstream's own credentials. Headers Atlas sets for the upstream (trace context, an
inference gateway's steering headers) and the ones it must strip belong here too.
"""

from __future__ import annotations


def stamp(headers: dict[str, str], credentials: str | None, request_id: str | None = None,
          traceparent: str | None = None) -> dict[str, str]:
    """``headers`` (changed in place) with Atlas's request id, the upstream's credentials
    (``Authorization`` from ATLAS_UPSTREAM_API_KEY, never the client's key) and, when the gateway
    traces, its own ``traceparent`` (telemetry/: the upstream's spans become the gateway's
    children; with tracing off the client's own passes through)."""
    if request_id is not None:
        headers["x-request-id"] = request_id
    if traceparent is not None:
        headers["traceparent"] = traceparent
    if credentials:
        headers["authorization"] = credentials
    return headers
