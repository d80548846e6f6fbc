"""``/v1/usage``: the caller's own settled usage, limits and what is left, and the same for its
AtlasQuota."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import TYPE_CHECKING

from atlas_core import contract

from .. import metrics
from ..http import errors
from ..http.asgi import Headers, Scope, Send, send_json
from ..store.failures import REDIS_FAILURES, is_transport_failure, reply_error
from .base import ServiceEndpoint

if TYPE_CHECKING:
    from ..runtime import Runtime


def _remaining(limits: contract.Limits, usage: contract.Usage) -> dict:
    def left(limit: int | None, used: int) -> int | None:
        return None if limit is None else max(0, limit - used)

    out: dict[str, int | str | None] = {
        "tokensToday": left(limits.tokens_per_day, usage.tokens_today),
        "tokensThisMonth": left(limits.tokens_per_month, usage.tokens_this_month),
    }
    if limits.cost_limited:  # decimal strings, like status.usage.costToday

        def cost_left(limit: float | None, used: int | None) -> str | None:
            return None if limit is None else contract.format_micro(max(0, contract.to_micro(limit) - (used or 0)))

        out["costToday"] = cost_left(limits.cost_per_day, usage.cost_today)
        out["costThisMonth"] = cost_left(limits.cost_per_month, usage.cost_this_month)
    return out


# what each soft budget leaves is shown under the usage figure it counts
_SOFT_FIGURES = {
    "softTokensPerDay": "tokensToday",
    "softTokensPerMonth": "tokensThisMonth",
    "softCostPerDay": "costToday",
    "softCostPerMonth": "costThisMonth",
}


def _soft(limits: contract.Limits, usage: contract.Usage) -> dict:
    """``demoted``: the first soft budget the settled usage has reached (every request is then
    admitted as Sheddable), or None; ``remainingBeforeDemotion``: what each leaves (None: not set)."""
    left: dict = {"tokensToday": None, "tokensThisMonth": None}
    for name, limit, used in contract.soft_budgets(limits, usage):
        rest = max(0, limit - used)
        left[_SOFT_FIGURES[name]] = contract.format_micro(rest) if "Cost" in name else rest
    passed = contract.soft_limit_passed(limits, usage)
    return {"demoted": passed[0] if passed else None, "remainingBeforeDemotion": left}


def _price_list(table: contract.PriceTable | None) -> dict | None:
    return None if table is None else {"name": table.name, "currency": table.currency}


class UsageEndpoint(ServiceEndpoint):
    """The caller's own settled usage, limits and what is left, and the same for its quota."""

    async def handle(self, rt: Runtime, scope: Scope, send: Send, headers: Headers) -> None:
        principal = await self.principal(rt, scope)
        now = datetime.now(timezone.utc)
        try:
            usages = await contract.read_usages(
                rt.redis, principal.subjects, now, dict.fromkeys(principal.subjects, principal.tag)
            )
        except REDIS_FAILURES as exc:
            if not is_transport_failure(exc):
                raise reply_error("usage", exc) from None
            metrics.count_redis_error("usage")
            raise errors.redis_unavailable() from None
        key = principal.key
        key_usage = usages[principal.subjects[0]]
        doc = {
            "key": {"namespace": key.namespace, "name": key.name, "keyId": key.key_id},
            "usage": key_usage.to_status(priced=key.price_list is not None),
            "limits": key.limits.to_spec(),
            "remaining": _remaining(key.limits, key_usage),
            **_soft(key.limits, key_usage),
            "quota": None,
        }
        if key.price_list is not None:
            doc["priceList"] = _price_list(key.price_list)
        if principal.quota is not None:
            quota_usage = usages[principal.subjects[1]]
            doc["quota"] = {
                "name": principal.quota.name,
                "usage": quota_usage.to_status(priced=principal.quota.price_list is not None),
                "limits": principal.quota.limits.to_spec(),
                "remaining": _remaining(principal.quota.limits, quota_usage),
                **_soft(principal.quota.limits, quota_usage),
            }
            if principal.quota.price_list is not None:
                doc["quota"]["priceList"] = _price_list(principal.quota.price_list)
        await send_json(send, 200, doc, headers)
