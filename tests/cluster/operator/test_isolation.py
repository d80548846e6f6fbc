"""One object never stops the operator (issue 27), with the real operator, kube-apiserver, Redis
and gateway: a key with a 10^9 monthly budget and a trickle of use (whose forecast once ran past
year 9999 and halted every status) beside ordinary keys and a quota; every usage reaches its
status. Then one key whose counters cannot be read: it alone shows it, the others go on."""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from atlas_core import contract
from atlas_core.contract import HistorySample

from .procs import key_manifest, quota_manifest, secret_manifest, wait_until

pytestmark = pytest.mark.cluster

# The mock upstream reports these counts: 2 tokens settled per request
TRICKLE = {"x-mock-prompt-tokens": "1", "x-mock-completion-tokens": "1"}


@pytest.fixture(autouse=True)
def _stack(operator, gateway):
    """Every test here needs the operator and the gateway running."""


def settled_this_month(redis_client, subject: str, tag: str | None = None) -> int:
    day, month = contract.usage_keys(subject, datetime.now(timezone.utc), tag)
    return contract.parse_usage(
        redis_client.hgetall(day), redis_client.hgetall(month), datetime.now(timezone.utc)
    ).tokens_this_month


def shown_this_month(kube, kind: str, name: str) -> int | None:
    return ((kube.get(kind, name) or {}).get("status", {}).get("usage") or {}).get("tokensThisMonth")


def seed_an_hour_of_history(redis_client, subject: str) -> None:
    """The key has been quiet for an hour: the burn rate of its first tokens is then a trickle
    (what the operator's persisted history gives a key that has existed that long)."""
    now = datetime.now(timezone.utc)
    sample = HistorySample(int((time.time() - 3500) * 1000), contract.month_of(now), 0, 0)
    redis_client.set(contract.history_key(subject), contract.encode_history([sample]), ex=contract.HISTORY_TTL_SECONDS)


def metric(operator, metric_name: str, **labels) -> float | None:
    text = httpx.get(operator.metrics_url, timeout=5).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == metric_name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return None


def test_a_huge_budget_with_a_trickle_of_use_stops_no_status(kube, gateway, redis_client):
    big = contract.key_subject(kube.ns, "big")
    seed_an_hour_of_history(redis_client, big)  # before the operator first sees the key
    kube.apply(quota_manifest("shared", tokensPerDay=100_000))
    kube.apply(key_manifest("big", limits={"tokensPerMonth": 1_000_000_000}))
    kube.apply(key_manifest("plain", limits={"tokensPerDay": 100_000}))
    kube.apply(key_manifest("member", quotaRef="shared"))
    keys = {
        name: wait_until(f"the Secret of {name}", lambda n=name: kube.secret_key(f"{n}-api-key"), 30)
        for name in ("big", "plain", "member")
    }
    for name, key in keys.items():
        wait_until(f"{name} accepted", lambda k=key: gateway.chat(k, tokens=1, headers=TRICKLE)[0] == 200, 30)

    # 4 tokens in an hour: at ~4 tokens/hour 10^9 lasts ~28,000 years
    assert gateway.chat(keys["big"], tokens=1, headers=TRICKLE)[0] == 200
    for _ in range(3):
        assert gateway.chat(keys["plain"])[0] == 200
        assert gateway.chat(keys["member"])[0] == 200

    def tag(name: str) -> str | None:
        return contract.slot_tag(kube.ns, name, "shared") if name == "member" else None

    expected = {
        ("atlaskey", name): settled_this_month(redis_client, contract.key_subject(kube.ns, name), tag(name))
        for name in keys
    }
    expected[("atlasquota", "shared")] = settled_this_month(redis_client, contract.quota_subject(kube.ns, "shared"))
    assert expected[("atlaskey", "big")] == 4 and all(expected.values())
    for (kind, name), tokens in sorted(expected.items(), key=lambda item: item[0][1] == "big"):  # the others first
        wait_until(
            f"{kind} {name} shows its {tokens} tokens",
            lambda k=kind, n=name, t=tokens: shown_this_month(kube, k, n) == t,
            30,
        )

    forecast = wait_until("the big key's forecast", lambda: kube.get("atlaskey", "big")["status"].get("forecast"), 30)
    assert 0 < forecast["tokensPerHour"] <= 5
    assert "exhaustsAt" not in forecast  # the month ends long before the budget runs out
    risk = kube.condition("atlaskey", "big", "BudgetAtRisk")
    assert (risk["status"], risk["reason"]) == ("False", "WithinBudget")


def events_of(kube, name: str) -> list[tuple[str, str]]:
    res = kube("get", "events", "--field-selector", f"involvedObject.name={name}", "-o", "json")
    return [(e["reason"], e["message"]) for e in json.loads(res.stdout)["items"]]


def test_an_object_whose_usage_cannot_be_read_shows_it_and_stops_no_other(kube, gateway, operator, redis_client):
    kube.apply(key_manifest("damaged", limits={"tokensPerDay": 100_000}))
    kube.apply(key_manifest("healthy", limits={"tokensPerDay": 100_000}))
    keys = {
        name: wait_until(f"the Secret of {name}", lambda n=name: kube.secret_key(f"{n}-api-key"), 30)
        for name in ("damaged", "healthy")
    }
    for key in keys.values():
        wait_until("accepted", lambda k=key: gateway.chat(k, tokens=1, headers=TRICKLE)[0] == 200, 30)
    damaged = contract.key_subject(kube.ns, "damaged")
    day, _ = contract.usage_keys(damaged, datetime.now(timezone.utc))
    redis_client.hset(day, contract.USAGE_SETTLED, "not-a-number")  # what no gateway writes

    stale = wait_until(
        "UsageStale on the damaged key",
        lambda: (c := kube.condition("atlaskey", "damaged", "UsageStale")).get("status") == "True" and c,
        30,
    )
    assert stale["reason"] == "UsageUnreadable" and "not-a-number" in stale["message"]
    wait_until("its Event", lambda: any(r == "UsageWriteBackFailed" for r, _ in events_of(kube, "damaged")), 15)
    labels = dict(loop="usage write-back", kind="AtlasKey", namespace=kube.ns, name="damaged")
    failures = wait_until(
        "the failure counter", lambda: metric(operator, "atlas_operator_object_failures_total", **labels), 15
    )

    for _ in range(2):  # the others go on
        assert gateway.chat(keys["healthy"], tokens=1, headers=TRICKLE)[0] == 200
    wait_until("the healthy key's usage", lambda: shown_this_month(kube, "atlaskey", "healthy") == 6, 30)
    assert wait_until(
        "counted every cycle",
        lambda: metric(operator, "atlas_operator_object_failures_total", **labels) > failures + 1,
        15,
    )
    assert len([r for r, _ in events_of(kube, "damaged") if r == "UsageWriteBackFailed"]) == 1  # once
    assert operator.log_text().count(f"AtlasKey {kube.ns}/damaged: usage write-back failed") == 1

    redis_client.hset(day, contract.USAGE_SETTLED, 2)  # repaired: the condition goes, the usage shows
    wait_until("UsageStale removed", lambda: not kube.condition("atlaskey", "damaged", "UsageStale"), 30)
    assert shown_this_month(kube, "atlaskey", "damaged") == 2
    wait_until(
        "the log saying it works again",
        lambda: f"AtlasKey {kube.ns}/damaged: usage write-back works again" in operator.log_text(),
        15,
    )


def test_a_key_that_fails_to_reconcile_shows_it_is_retried_and_recovers(kube, gateway, operator, redis_client):
    """Its config's Redis key holds the wrong type (a GET answers WRONGTYPE): that key alone
    fails, with one Event and its counter; once Redis is repaired the retry serves it."""
    value = f"sk-wrongtype-{kube.ns}"
    blocked = contract.key_config_key(contract.hash_api_key(value))
    redis_client.hset(blocked, "not", "a string")
    kube.apply(secret_manifest("blocked-secret", value, atlaskey="blocked"))
    kube.apply(key_manifest("blocked", secretName="blocked-secret"))
    kube.apply(key_manifest("fine"))

    fine = wait_until("the other key's Secret", lambda: kube.secret_key("fine-api-key"), 30)
    wait_until("the other key works", lambda: gateway.chat(fine, tokens=1, headers=TRICKLE)[0] == 200, 30)
    wait_until("ReconcileFailed", lambda: [m for r, m in events_of(kube, "blocked") if r == "ReconcileFailed"], 30)
    labels = dict(loop="reconcile", kind="AtlasKey", namespace=kube.ns, name="blocked")
    wait_until(
        "its retries counted",
        lambda: (metric(operator, "atlas_operator_object_failures_total", **labels) or 0) >= 2,
        30,
    )
    (message,) = [m for r, m in events_of(kube, "blocked") if r == "ReconcileFailed"]  # once, not per retry
    assert "WRONGTYPE" in message and value not in message
    assert gateway.chat(value)[0] != 200  # not served (the gateway itself reads WRONGTYPE: a 500)

    redis_client.delete(blocked)
    wait_until("the retry serves it", lambda: gateway.chat(value, tokens=1, headers=TRICKLE)[0] == 200, 60)
    wait_until("Ready", lambda: kube.condition("atlaskey", "blocked").get("status") == "True", 30)
    assert f"AtlasKey {kube.ns}/blocked: reconcile works again" in operator.log_text()
