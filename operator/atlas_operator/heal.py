"""Self-healing: when Redis lost its data (no CONFIG_EPOCH), rewrite all config from the
operator's in-memory indexes, without a single Kubernetes API call, then set the epoch.

Each object's config is built on its own: one that cannot be (failures.py) stays absent, so the
gateway refuses it as it would any unknown key, and every other config is restored."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Callable, Iterable, Mapping

from atlas_core.contract import KeyConfig, QuotaConfig

from . import store
from .keys import desired_key_config
from .price_lists import PriceListLookup, no_price_lists
from .quotas import desired_quota_config
from .settings import KEYS, QUOTAS
from .views import ObjectView, SecretView

Failed = list[tuple[str, ObjectView, Exception]]  # (plural, object, what failed)


@dataclass
class Healed:
    rewritten: int
    failed: Failed = field(default_factory=list)


def desired_configs(
    keys: Iterable[ObjectView],
    quotas: Iterable[ObjectView],
    secrets: Mapping[tuple[str, str], SecretView],
    now: datetime,
    price_list: PriceListLookup = no_price_lists,
    failed: Failed | None = None,
) -> tuple[list[tuple[str, KeyConfig]], list[QuotaConfig]]:
    """Every config the indexes imply; an object whose config cannot be built lands in ``failed``."""
    failed = failed if failed is not None else []
    live_quotas = [q for q in quotas if not q.deleting]
    names = {(q.namespace, q.name) for q in live_quotas}
    quota_configs = []
    for quota in live_quotas:
        try:
            quota_configs.append(desired_quota_config(quota.namespace, quota.name, quota.spec, price_list))
        except Exception as exc:  # noqa: BLE001 - this quota's own failure
            failed.append((QUOTAS, quota, exc))
    key_configs: list[tuple[str, KeyConfig]] = []
    seen_hashes: set[str] = set()
    for key in keys:
        secret = secrets.get((key.namespace, key.secret_name))
        if key.deleting or secret is None or secret.key_hash is None or secret.key_hash in seen_hashes:
            continue  # no usable key (SecretInvalid) or a duplicate: nothing the gateway may accept
        seen_hashes.add(secret.key_hash)  # even when it fails below: a duplicate never takes it over
        try:
            config, *_ = desired_key_config(
                key.namespace,
                key.name,
                key.spec,
                secret.key_hash,
                lambda ns, name: (ns, name) in names,
                now,
                price_list,
            )
        except Exception as exc:  # noqa: BLE001 - this key's own failure
            failed.append((KEYS, key, exc))
            continue
        key_configs.append((secret.key_hash, config))
    return key_configs, quota_configs


async def heal_if_needed(
    redis: Any,
    keys: Iterable[ObjectView],
    quotas: Iterable[ObjectView],
    secrets: Mapping[tuple[str, str], SecretView],
    now: datetime,
    price_list: PriceListLookup = no_price_lists,
    identity: Callable[[], tuple[dict[str, str], dict[str, str]]] | None = None,
) -> Healed | None:
    """None when Redis still has its config; else what was rewritten and what could not be.
    ``identity``: the token subjects' bindings and bound ServiceAccount UIDs, written too."""
    if await store.epoch_present(redis):
        return None
    failed: Failed = []
    key_configs, quota_configs = desired_configs(keys, quotas, secrets, now, price_list, failed)
    await store.write_all(redis, key_configs, quota_configs, identity() if identity is not None else None)
    return Healed(len(key_configs) + len(quota_configs), failed)
