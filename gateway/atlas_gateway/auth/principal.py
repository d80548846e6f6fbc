"""A key's configuration as the hot path needs it: its AtlasKey, its AtlasQuota, the subjects
their counters are kept under, allowed models and prices, precomputed once per config load."""

from __future__ import annotations

from typing import Any

from atlas_core import contract

from ..globs import compile_globs
from ..http import errors


class Principal:
    """Everything the hot path needs about one key, precomputed when the config is loaded."""

    __slots__ = (
        "key",
        "quota",
        "quota_missing",
        "ref",
        "fairness_id",
        "subjects",
        "subject_limits",
        "allows_model",
        "priority",
        "price_tables",
        "cost_limited",
        "priced",
        "currency",
        "tag",
        "ledger",
        "soft_limited",
        "_prices",
    )
    _PRICES_KEPT = 256  # models whose prices are remembered (a client names any model it likes)

    def __init__(self, key: contract.KeyConfig, quota: contract.QuotaConfig | None) -> None:
        self.key = key
        self.quota = quota
        self.quota_missing = bool(key.quota) and quota is None
        self.ref = key.ref
        # the tenant an inference gateway's fair queueing sees: the shared budget, else the key
        # (namespace/name, never key material; upstream/headers.py stamps it when configured)
        self.fairness_id = key.quota_ref or key.ref
        # one hash tag for every counter of this key and of its quota: one cluster slot per call
        self.tag = contract.slot_tag(key.namespace, key.name, key.quota)
        subjects = [(contract.key_subject(key.namespace, key.name), key.limits, key.shortfall)]
        tables = [key.price_list]
        if quota is not None:
            subjects.append((contract.quota_subject(quota.namespace, quota.name), quota.limits, quota.shortfall))
            tables.append(quota.price_list)
        # per subject: its resolved price list (or None) and whether it has a cost budget
        self.price_tables = tuple(tables)
        self.cost_limited = tuple(lim.cost_limited for _, lim, _ in subjects)
        self.priced = any(t is not None for t in tables)
        self.currency = key.price_list.currency if key.price_list is not None else None
        self.subjects = tuple(s for s, _, _ in subjects)
        self.subject_limits = tuple((lim, short) for _, lim, short in subjects)  # per subject, as subjects
        # a soft budget on the key or its quota may demote its requests (admit.lua)
        self.soft_limited = any(lim.soft_limited for _, lim, _ in subjects)
        self.allows_model = compile_globs(tuple(key.models))
        self.priority = key.priority if key.priority in contract.PRIORITIES else contract.DEFAULT_PRIORITY
        # what the ledger derives from this config (its script arguments, call shapes), built by
        # the ledger on first use and kept for as long as this config holds (ledger/script_args.py)
        self.ledger: Any = None
        self._prices: dict[str, tuple] = {}  # model -> prices_for(model): globs matched once per model

    def refusal(self, now: float) -> errors.GatewayError | None:
        """Why this key may not be served right now (403), or None."""
        key = self.key
        if key.refusal:
            return errors.permission_denied(
                f"API key {key.ref} is not usable: {key.refusal_message or key.refusal}", key.refusal
            )
        if key.suspended:
            return errors.permission_denied(f"API key {key.ref} is suspended.", "Suspended")
        if key.expires_at is not None and now >= key.expires_at:
            return errors.permission_denied(f"API key {key.ref} has expired.", "Expired")
        if self.quota_missing:
            return errors.permission_denied(
                f"API key {key.ref} refers to AtlasQuota {key.quota!r}, which does not exist.",
                "QuotaNotFound",
            )
        quota = self.quota
        if quota is not None and quota.refusal:
            return errors.permission_denied(
                f"API key {key.ref} is not usable: AtlasQuota {quota.name!r}: {quota.refusal_message or quota.refusal}",
                quota.refusal,
            )
        return None

    def prices_for(self, model: str) -> tuple["contract.Price | None", ...] | None:
        """Per subject, the price of ``model`` (None: unpriced subject); None when no subject
        is priced at all (the common case: no cost work). Raises the 403 for a cost-limited
        subject whose price list has no price for ``model`` and no default."""
        if not self.priced:
            return None
        known = self._prices.get(model)
        if known is not None:
            return known
        out = []
        for subject, table, limited in zip(self.subjects, self.price_tables, self.cost_limited):
            price = table.price_of(model) if table is not None else None
            if price is None and limited:
                owner = ("AtlasQuota " if subject.startswith("q:") else "AtlasKey ") + subject[2:]
                listed = f"AtlasPriceList {table.name!r}" if table is not None else "no AtlasPriceList"
                raise errors.permission_denied(
                    f"{owner} has a cost budget, but {listed} has no price for model '{model}' "
                    "(and no default): the request cannot be priced.",
                    "model_not_priced",
                )
            out.append(price)
        if len(self._prices) >= self._PRICES_KEPT:
            self._prices.clear()
        prices = self._prices[model] = tuple(out)
        return prices
