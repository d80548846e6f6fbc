"""One admitted request's reservation, settled exactly once whatever ends the request.

Admission (admission.py) reserves; the :class:`Ticket` it leads to is the request's claim on
that reservation until settlement: the real usage is charged (priced when the key has a price
list) and the rest refunded, in one script call (settle.lua). A settlement whose outcome is
unknown (a timeout, a lost connection) is handed to recovery.py, which resolves it once Redis
answers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .. import metrics
from ..auth.principal import Principal
from ..store.failures import REDIS_FAILURES, is_transport_failure, reply_error
from .script_args import NO_COST, cost_args, key_calls

if TYPE_CHECKING:
    from .admission import Admission
    from .recovery import Recovery


class Ticket:
    """One admitted request's reservation; ``settle`` runs at most once."""

    __slots__ = ("admission", "recovery", "principal", "request_id", "reserved", "done", "prices", "model", "cost")

    def __init__(
        self,
        admission: Admission,
        recovery: Recovery,
        principal: Principal,
        request_id: str,
        reserved: int,
        prices: tuple | None = None,
        model: str = "",
    ) -> None:
        self.admission = admission
        self.recovery = recovery
        self.principal = principal
        self.request_id = request_id
        self.reserved = reserved
        self.done = False
        self.prices = prices  # per subject (Principal.prices_for); None: nothing is priced
        self.model = model
        self.cost: int | None = None  # settled, on the AtlasKey's price list (micro-units of ``currency``)

    @property
    def currency(self) -> str | None:
        return self.principal.currency

    @property
    def leased(self) -> bool:
        """The request holds leases (refreshed while it is in flight)."""
        return key_calls(self.principal).leased

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
            if self.prices[0] is not None:
                self.cost = int(costs[0])
                if self.cost:
                    metrics.count_cost(self.principal, self.model, self.cost)
        try:
            # No asyncio.shield (it costs a task per request): the hot-path Redis client queues
            # the command synchronously before its first await, so a cancellation arriving now
            # still lets the settlement reach Redis. A failure is resolved by the recovery below.
            await self.admission.settle(self.principal, self.request_id, self.reserved, actual, costs)
            if self.recovery.replays:  # Sentinel: a failover may still lose this (recovery.py)
                self.recovery.settled(self.principal, self.request_id, self.reserved, actual, costs)
        except REDIS_FAILURES as exc:
            if is_transport_failure(exc):
                metrics.count_redis_error("settle")
            else:
                reply_error("settle", exc)
            # whether it ran is unknown: undo.lua settles it once, when Redis answers again
            self.recovery.settle_later(self.principal, self.request_id, self.reserved, actual, costs)
