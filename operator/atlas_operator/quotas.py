"""AtlasQuota reconcile: its QuotaConfig in Redis and its status (keys bound, Ready)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from atlas_core.contract import Limits, QuotaConfig, Shortfall

from . import conditions as cond
from . import store
from .kube import KubeApi
from .price_lists import PriceListLookup, no_price_lists, resolve_price_list
from .settings import QUOTAS
from .status import starting_fields, write_status


@dataclass
class QuotaOutcome:
    redis_written: bool = False
    status_patched: bool = False


def desired_quota_config(
    namespace: str, name: str, spec: dict[str, Any], price_list: PriceListLookup = no_price_lists
) -> QuotaConfig:
    table, missing = resolve_price_list(namespace, spec, price_list)
    return QuotaConfig(
        namespace=namespace,
        name=name,
        limits=Limits.from_spec(spec.get("limits")),
        shortfall=Shortfall.from_spec(spec),
        price_list=table,
        refusal=cond.PRICE_LIST_NOT_FOUND if missing else None,
        refusal_message=missing,
    )


async def reconcile_quota(
    obj: dict[str, Any],
    *,
    kube: KubeApi,
    redis: Any,
    key_count: int,
    now: datetime | None = None,
    price_list: PriceListLookup = no_price_lists,
) -> QuotaOutcome:
    now = now or datetime.now(timezone.utc)
    meta = obj["metadata"]
    namespace, name = meta["namespace"], meta["name"]
    outcome = QuotaOutcome()
    config = desired_quota_config(namespace, name, obj.get("spec") or {}, price_list)
    outcome.redis_written = await store.write_quota_config(redis, config)

    status = obj.get("status") or {}
    generation = meta.get("generation")
    if config.refusal:  # its keys are refused by the gateway until the price list exists
        conditions = cond.with_verdict(
            status.get("conditions"), False, config.refusal, config.refusal_message or config.refusal, generation, now
        )
    else:
        conditions = cond.with_verdict(
            status.get("conditions"), True, cond.ACTIVE, "the budget is enforced by the gateway", generation, now
        )
    conditions, usage = starting_fields(status, conditions, generation, now)
    desired: dict[str, Any] = {"observedGeneration": generation, "keys": key_count, "conditions": conditions}
    if usage is not None:
        desired["usage"] = usage
    outcome.status_patched = await write_status(kube, QUOTAS, obj, desired)
    if outcome.redis_written and cond.find(status.get("conditions"), cond.READY) is None:
        await kube.post_event(QUOTAS, obj, "Normal", cond.ACTIVE, "budget written to the gateway's store")
    return outcome


async def delete_quota(obj: dict[str, Any], *, redis: Any) -> bool:
    meta = obj["metadata"]
    return await store.delete_quota_config(redis, meta["namespace"], meta["name"])
