"""The limit kinds, as the ledger's scripts know them: what admit.lua is told about each subject's
limits, which requests hold a lease, and what each refusal of admit.lua means to a client.

A new limit kind is a field of ``atlas_core.contract.Limits`` (written by the operator), its
argument here (:func:`limit_args`, at the position admit.lua reads it), its check in admit.lua,
and, when it can refuse, a row of :data:`REFUSALS` under the reason code admit.lua returns.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from atlas_core import contract

from ..http import errors

# admit.lua's reason codes (its header lists the same)
OK, REQUESTS, CONCURRENCY, TOKENS, TOO_LARGE, DAY, MONTH, COST_DAY, COST_MONTH, SHED_DEMOTED = range(10)
UNDONE = 99  # the request id was undone (undo.lua) before its admission ran


def _num(value: Any) -> bytes:
    """A limit as a script argument; 0 means "no limit of this kind"."""
    if value is None:
        return b"0"
    text = repr(value) if isinstance(value, float) and not value.is_integer() else str(int(value))
    return text.encode()


def _micro(value: Any) -> bytes:
    """A cost limit (currency) as integer micro-units; 0 means "no limit of this kind"."""
    return b"0" if value is None else str(contract.to_micro(value)).encode()


def limit_args(limits: contract.Limits, shortfall: contract.Shortfall) -> list[bytes]:
    """admit.lua's 14 arguments per subject, in its order."""
    return [
        _num(limits.requests_per_second),
        _num(limits.effective_burst),
        _num(limits.tokens_per_minute),
        _num(limits.tokens_per_day),
        _num(limits.tokens_per_month),
        _num(limits.max_concurrent),
        b"1" if shortfall.shrink else b"0",
        _num(shortfall.min_completion_tokens),
        _micro(limits.cost_per_day),
        _micro(limits.cost_per_month),
        _num(limits.soft_tokens_per_day),
        _num(limits.soft_tokens_per_month),
        _micro(limits.soft_cost_per_day),
        _micro(limits.soft_cost_per_month),
    ]


# admit.lua's soft budget codes: 1 + the index in contract.SOFT_LIMITS (0: none passed)
SOFT_BUDGETS = (None, *(name for name, _ in contract.SOFT_LIMITS))


def settle_limit_args(limits: contract.Limits) -> list[bytes]:
    """settle.lua's (and undo.lua's) 2 arguments per subject."""
    return [_num(limits.tokens_per_minute), b"1" if limits.cost_limited else b"0"]


def holds_lease(limits: contract.Limits) -> bool:
    """Whether a request holds a lease on a subject with these limits until it is settled
    (admit.lua: a concurrency slot, or its reservation against a day/month budget)."""
    return bool(limits.max_concurrent or limits.tokens_per_day or limits.tokens_per_month or limits.cost_limited)


@dataclass(frozen=True, slots=True)
class Refusal:
    """What one of admit.lua's refusals means: ``name`` is the rejections metric's reason;
    ``rate`` a 429 rate limit of that type (``requests`` or ``tokens``), None a spent budget
    (429 ``insufficient_quota``, not to be retried before it resets); ``message`` names the
    AtlasKey or AtlasQuota that refused (``{owner}``) and what the request needed (``{reserve}``)."""

    name: str
    rate: str | None
    message: str

    def error(self, owner: str, reserve: int, retry_after: int) -> errors.GatewayError:
        message = self.message.format(owner=owner, reserve=reserve)
        err = (
            errors.rate_limited(self.rate, message, retry_after)
            if self.rate is not None
            else errors.quota_exhausted(message, retry_after)
        )
        err.reason = self.name
        return err


_DAY_RESET = "it resets at 00:00 UTC."
_MONTH_RESET = "it resets on the 1st, 00:00 UTC."
REFUSALS = {
    REQUESTS: Refusal("requests_per_second", "requests", "Rate limit reached for requests per second on {owner}."),
    CONCURRENCY: Refusal("concurrency", "requests", "Too many concurrent requests on {owner}."),
    TOKENS: Refusal(
        "tokens_per_minute",
        "tokens",
        "Rate limit reached for tokens per minute on {owner}: this request needs {reserve} tokens.",
    ),
    TOO_LARGE: Refusal(
        "tokens_per_minute",
        "tokens",
        "Request too large: it needs {reserve} tokens, more than the tokens-per-minute limit of "
        "{owner}. Lower max_tokens or the prompt size.",
    ),
    DAY: Refusal(
        "tokens_per_day",
        None,
        "Daily token budget of {owner} is spent (this request needs {reserve} tokens); " + _DAY_RESET,
    ),
    MONTH: Refusal(
        "tokens_per_month",
        None,
        "Monthly token budget of {owner} is spent (this request needs {reserve} tokens); " + _MONTH_RESET,
    ),
    COST_DAY: Refusal(
        "cost_per_day",
        None,
        "Daily cost budget of {owner} is spent (or cannot hold this request's priced reservation); " + _DAY_RESET,
    ),
    COST_MONTH: Refusal(
        "cost_per_month",
        None,
        "Monthly cost budget of {owner} is spent (or cannot hold this request's priced reservation); " + _MONTH_RESET,
    ),
    # an admission that ran after the gateway undid its request id: its caller has already been
    # answered (503), so no client reads this one
    UNDONE: Refusal("undone", None, "The request on {owner} was withdrawn after a Redis failure."),
}
