"""AtlasPriceList status: which models it prices, which keys and quotas name it, and Ready.

A price list has no config of its own in Redis (the keys and quotas naming it carry its prices),
so its status is all there is to write: on its own events (Ready and observedGeneration at once,
for GitOps tools) and each write-back cycle (who uses it changes with other objects).
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from atlas_core import contract

from . import conditions as cond
from .kube import KubeApi
from .settings import PRICE_LISTS
from .status import write_status
from .views import ObjectView

USED_BY_SHOWN = 50  # names listed per kind in status.usedBy (the counts are complete)


def desired_status(view: ObjectView, keys: list[str], quotas: list[str], now: datetime) -> dict[str, Any]:
    spec, generation = view.spec, view.generation
    try:
        contract.PriceTable.from_spec(view.name, spec)
        in_effect, reason, message = True, cond.ACTIVE, "its prices apply to the keys and quotas naming it"
    except (ValueError, TypeError, KeyError, ArithmeticError) as exc:  # what the CRD schema cannot rule out
        in_effect, reason, message = False, cond.PRICES_INVALID, f"spec cannot be read as prices: {exc}"
    return {
        "observedGeneration": generation,
        "models": [str(p.get("model")) for p in spec.get("prices") or ()],
        "pricesOtherModels": spec.get("default") is not None,
        "keys": len(keys),
        "quotas": len(quotas),
        "usedBy": {"keys": sorted(keys)[:USED_BY_SHOWN], "quotas": sorted(quotas)[:USED_BY_SHOWN]},
        "conditions": cond.with_verdict(view.status.get("conditions"), in_effect, reason, message, generation, now),
    }


async def reconcile_price_list(
    view: ObjectView, *, kube: KubeApi, keys: list[str], quotas: list[str], now: datetime | None = None
) -> bool:
    """Patch what differs; True when a patch was written. StatusConflict: re-read and run again."""
    desired = desired_status(view, keys, quotas, now or datetime.now(timezone.utc))
    obj = {
        "metadata": {"namespace": view.namespace, "name": view.name, "resourceVersion": view.resource_version},
        "status": view.status,
    }
    return await write_status(kube, PRICE_LISTS, obj, desired)
