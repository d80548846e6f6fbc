"""Cost budgets through the official openai SDK: a cost-limited key is served until its priced
spend reaches costPerDay, then gets insufficient_quota; /v1/usage and atlas_cost_total agree."""

from __future__ import annotations

from decimal import Decimal

import httpx
import openai
import pytest

from atlas_core import contract

MODEL = "llama-3.1-8b-instruct"
MESSAGES = [{"role": "user", "content": "Hello there"}]
# 100 USD per million tokens either way: 100 micro-units per token, so 0.01 USD ~ 100 tokens
PRICES = contract.PriceTable.from_spec(
    "prices", {"currency": "USD", "prices": [{"model": "llama-*", "input": 100, "output": 100}]}
)


def test_cost_budget_spent_is_insufficient_quota(sdk, new_key, gateway):
    key, name = new_key(contract.Limits(cost_per_day=0.01), price_list=PRICES)
    client = sdk(key)
    served = 0
    with pytest.raises(openai.RateLimitError) as exc:
        for _ in range(100):  # a bound, not a wait: each request spends at least its prompt
            client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=8)
            served += 1
    assert served >= 1
    assert exc.value.body["code"] == "insufficient_quota"
    assert "Daily cost budget of AtlasKey team/" in exc.value.body["message"]

    usage = httpx.get(gateway.url + "/v1/usage", headers={"authorization": f"Bearer {key}"}).json()
    spent = Decimal(usage["usage"]["costToday"])
    assert Decimal("0") < spent <= Decimal("0.01")
    assert usage["priceList"] == {"name": "prices", "currency": "USD"}
    print(f"cost e2e: {served} served, spent {spent} USD of 0.01, {usage['usage']['tokensToday']} tokens")
    assert Decimal(usage["remaining"]["costToday"]) == Decimal("0.01") - spent
    # the cost is the upstream's usage priced: tokens x 100 micro-units each
    assert spent == Decimal(usage["usage"]["tokensToday"] * 100) / 1_000_000

    metrics = httpx.get(gateway.url + "/metrics").text
    line = next(l for l in metrics.splitlines() if l.startswith("atlas_cost_total{") and f'name="{name}"' in l)
    assert 'currency="USD"' in line and 'namespace="team"' in line and f'model="{MODEL}"' in line
    assert Decimal(line.rsplit(" ", 1)[1]).quantize(Decimal("0.000001")) == spent


def test_cost_limited_key_refuses_an_unpriced_model(sdk, new_key):
    key, _ = new_key(contract.Limits(cost_per_day=1), price_list=PRICES)
    with pytest.raises(openai.PermissionDeniedError) as exc:
        sdk(key).chat.completions.create(model="qwen2.5-7b-instruct", messages=MESSAGES, max_tokens=4)
    assert "no price for model 'qwen2.5-7b-instruct'" in exc.value.body["message"]
