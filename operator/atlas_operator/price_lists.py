"""``spec.priceListRef`` of an AtlasKey or AtlasQuota resolved into the price table its config
carries (the gateway never reads Kubernetes)."""

from __future__ import annotations

from typing import Any, Callable

from atlas_core import contract

# (namespace, name) -> the AtlasPriceList's spec, or None when it does not exist
PriceListLookup = Callable[[str, str], "dict[str, Any] | None"]


def no_price_lists(namespace: str, name: str) -> None:
    return None


def resolve_price_list(
    namespace: str, spec: dict[str, Any], price_list: PriceListLookup
) -> tuple[contract.PriceTable | None, str | None]:
    """The table, or the refusal message when the spec names a price list that does not exist
    (never served unpriced)."""
    ref = spec.get("priceListRef") or None
    if not ref:
        return None, None
    found = price_list(namespace, ref)
    if found is None:
        return None, f"AtlasPriceList {ref!r} not found in namespace {namespace!r}"
    return contract.PriceTable.from_spec(ref, found), None
