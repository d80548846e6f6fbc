"""The record one inference request carries through the gateway (handlers/inference.py,
then upstream/call.py)."""

from __future__ import annotations

from time import perf_counter
from typing import TYPE_CHECKING

from .http.asgi import request_id_header

if TYPE_CHECKING:
    from .auth.principal import Principal
    from .ledger.ticket import Ticket
    from .metering.bounds import Bound
    from .routes import Route
    from .runtime import Runtime


class RequestContext:
    """One inference request, from its headers to its settlement: what each step learnt, for the
    steps after it (and for the metrics, whichever step ends the request)."""

    __slots__ = ("rt", "route", "id", "started", "response_headers", "ref", "model", "priority",
                 "principal", "forward", "raw", "doc", "bound", "reserve", "ticket")

    def __init__(self, rt: Runtime, route: Route) -> None:
        self.rt = rt
        self.route = route
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

    @property
    def prompt_estimate(self) -> int:
        return self.bound.prompt
