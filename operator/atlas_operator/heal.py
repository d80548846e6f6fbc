"""Self-healing: when Redis lost its data (no CONFIG_EPOCH), rewrite all config from the
operator's in-memory indexes, without a single Kubernetes API call, then set the epoch."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Iterable, Mapping

from atlas_core.contract import KeyConfig, QuotaConfig

from . import store
from .keys import desired_key_config
from .price_lists import PriceListLookup, no_price_lists
from .quotas import desired_quota_config
from .views import ObjectView, SecretView


def desired_configs(
    keys: Iterable[ObjectView],
    quotas: Iterable[ObjectView],
    secrets: Mapping[tuple[str, str], SecretView],
    now: datetime,
    price_list: PriceListLookup = no_price_lists,
) -> tuple[list[tuple[str, KeyConfig]], list[QuotaConfig]]:
    live_quotas = [q for q in quotas if not q.deleting]
    names = {(q.namespace, q.name) for q in live_quotas}
    quota_configs = [desired_quota_config(q.namespace, q.name, q.spec, price_list) for q in live_quotas]
    key_configs: list[tuple[str, KeyConfig]] = []
    seen_hashes: set[str] = set()
    for key in keys:
        secret = secrets.get((key.namespace, key.secret_name))
        if key.deleting or secret is None or secret.key_hash is None or secret.key_hash in seen_hashes:
            continue  # no usable key (SecretInvalid) or a duplicate: nothing the gateway may accept
        seen_hashes.add(secret.key_hash)
        config, *_ = desired_key_config(
            key.namespace, key.name, key.spec, secret.key_hash,
            lambda ns, name: (ns, name) in names, now, price_list)
        key_configs.append((secret.key_hash, config))
    return key_configs, quota_configs


async def heal_if_needed(
    redis: Any,
    keys: Iterable[ObjectView],
    quotas: Iterable[ObjectView],
    secrets: Mapping[tuple[str, str], SecretView],
    now: datetime,
    price_list: PriceListLookup = no_price_lists,
) -> int | None:
    """None when Redis still has its config; else the number of configs rewritten."""
    if await store.epoch_present(redis):
        return None
    key_configs, quota_configs = desired_configs(keys, quotas, secrets, now, price_list)
    await store.write_all(redis, key_configs, quota_configs)
    return len(key_configs) + len(quota_configs)
