"""Cost-weighted budgets with the real operator (chart RBAC), kube-apiserver, Redis and gateway:
a key naming a missing AtlasPriceList is Ready=False/PriceListNotFound and refused; once the
price list exists it is served, and costToday appears in its status under traffic; deleting the
price list refuses it again (never served unpriced)."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from decimal import Decimal

import pytest

from atlas_core import contract

from .procs import key_manifest, wait_until

pytestmark = pytest.mark.cluster


@pytest.fixture(autouse=True)
def _stack(operator, gateway):
    """Every test here needs the operator and the gateway running."""


def price_list_manifest(name: str, **spec) -> str:
    return json.dumps(
        {
            "apiVersion": "atlas.bugvanquisher.io/v1alpha1",
            "kind": "AtlasPriceList",
            "metadata": {"name": name},
            "spec": spec,
        }
    )


def test_missing_price_list_refuses_then_costs_appear_in_status(kube, gateway, redis_client):
    kube.apply(key_manifest("spender", priceListRef="prices", limits={"costPerDay": 5}))
    key = wait_until("the generated Secret", lambda: kube.secret_key("spender-api-key"), 30)
    ready = wait_until(
        "Ready=False PriceListNotFound",
        lambda: (c := kube.condition("atlaskey", "spender")).get("reason") == "PriceListNotFound" and c,
        30,
    )
    assert ready["status"] == "False" and "'prices' not found" in ready["message"]
    status, body = gateway.chat(key)
    assert status == 403 and "not found" in body["error"]["message"]

    # 2 USD per million prompt tokens, 4 per million completion tokens, for llama* only
    kube.apply(price_list_manifest("prices", currency="USD", prices=[{"model": "llama-*", "input": 2, "output": 4}]))
    wait_until(
        "Ready=True once the price list exists",
        lambda: kube.condition("atlaskey", "spender").get("status") == "True",
        30,
    )
    wait_until("served", lambda: gateway.chat(key, tokens=16)[0] == 200, 30)
    for _ in range(4):
        assert gateway.chat(key, tokens=16)[0] == 200
    # a model with no price (and no default) is refused for this cost-limited key
    status, body = gateway.chat(key, model="qwen2.5-7b-instruct")
    assert status == 403 and "no price for model 'qwen2.5-7b-instruct'" in body["error"]["message"]

    subject = contract.key_subject(kube.ns, "spender")
    day_key, _ = contract.usage_keys(subject, datetime.now(timezone.utc))
    settled = wait_until("cost settled in Redis", lambda: int(redis_client.hget(day_key, "cost") or 0), 30)
    # every request is priced from the upstream's usage: prompt x 2 + completion x 4 (micro-units)
    tokens = int(redis_client.hget(day_key, "settled"))
    assert 2 * tokens <= settled <= 4 * tokens + 5  # rounding up adds at most 1 micro-unit per request
    usage = wait_until(
        "status.usage.costToday matches Redis",
        lambda: (
            (u := kube.get("atlaskey", "spender")["status"]["usage"]).get("costToday")
            == contract.format_micro(int(redis_client.hget(day_key, "cost")))
            and u
        ),
        30,
    )
    assert Decimal(usage["costToday"]) > 0 and usage["costThisMonth"] == usage["costToday"]

    # deleting the price list: refused again, Ready=False with the reason named
    kube("delete", "atlaspricelist", "prices")
    wait_until(
        "Ready=False PriceListNotFound after deletion",
        lambda: kube.condition("atlaskey", "spender").get("reason") == "PriceListNotFound",
        30,
    )
    wait_until("refused after deletion", lambda: gateway.chat(key)[0] == 403, 30)
