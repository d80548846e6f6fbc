"""The record one inference request carries through the gateway (handlers/inference.py,
then upstream/call.py)."""

from __future__ import annotations

from time import perf_counter
from typing import TYPE_CHECKING

from .http.asgi import request_id_header
from .telemetry.noop import NO_TRACE

if TYPE_CHECKING:
    from .auth.principal import Principal
    from .http.errors import GatewayError
    from .ledger.ticket import Ticket
    from .metering.bounds import Bound
    from .routes import Route
    from .runtime import Runtime
    from .upstream.call import Bill


class RequestContext:
    """One inference request, from its headers to its settlement: what each step learnt, for the
    steps after it (and for the metrics, whichever step ends the request)."""

    __slots__ = (
        "rt",
        "route",
        "method",
        "id",
        "started",
        "response_headers",
        "ref",
        "model",
        "priority",
        "principal",
        "forward",
        "raw",
        "doc",
        "bound",
        "reserve",
        "ticket",
        "trace",
        "status",
        "error",
        "error_type",
        "refused_by",
        "shrunk",
        "demoted",
        "fail_open",
        "billed",
        "cached",
        "response_model",
    )

    def __init__(self, rt: Runtime, route: Route) -> None:
        self.rt = rt
        self.route = route
        self.method = "POST"
        self.started = perf_counter()
        self.id = rt.new_request_id()  # also the lease member in Redis: never from the client
        self.response_headers: list[tuple[bytes, bytes]] = [request_id_header(self.id)]
        # metric labels, filled in as they become known
        self.ref = ""
        self.model = ""
        self.priority = ""
        self.principal: Principal | None = None
        self.forward: dict[str, str] = {}  # request headers for the upstream
        self.raw = b""  # the client's body, as received
        self.doc: dict = {}  # ... and parsed
        self.bound: Bound | None = None  # prompt bound, completion cap, sequences (metering/bounds.py)
        self.reserve = 0  # the tokens reserved (bound.reserve, or less when a Shrink budget lowered it)
        self.ticket: Ticket | None = None  # set once admitted (None: failing open, unmetered)
        # how it ended, for its span and its usage record (telemetry/attributes.py)
        self.trace = NO_TRACE  # its trace once the headers are read (telemetry: rt.tracing.start)
        self.status = 0  # the HTTP status answered (499: the client left)
        self.error: str | None = None  # why it was refused or failed, as the client was told
        self.error_type: str | None = None  # the error's code (invalid_api_key, insufficient_quota...)
        self.refused_by: tuple[str, str] | None = None  # (limit, "AtlasKey ns/name") of a refused admission
        self.shrunk = False  # a Shrink budget lowered the completion cap
        self.demoted: str | None = None  # the soft limit that demoted it
        self.fail_open = False  # Redis unreachable, let through unmetered
        self.billed: Bill | None = None  # what settlement charged
        self.cached = 0  # prompt tokens the upstream read from its cache
        self.response_model: str | None = None  # the upstream's "model" (read only while traced)

    @property
    def prompt_estimate(self) -> int:
        return self.bound.prompt if self.bound is not None else 0

    def refused(self, err: GatewayError) -> None:
        """The request ends with ``err``, an answer the gateway gives itself."""
        self.status = err.status
        self.error = err.message
        self.error_type = err.code or err.type
