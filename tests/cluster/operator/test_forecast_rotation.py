"""Forecasts and rotation with overlap, with the real operator, kube-apiserver, Redis and gateway:
traffic -> status.forecast, BudgetAtRisk, its Event, the Exhausts column and the operator's gauge;
the history survives an operator restart; rotationGracePeriod keeps both keys for its length."""

from __future__ import annotations

import threading

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from atlas_core import contract

from .procs import key_manifest, quota_manifest, secret_manifest, wait_until

pytestmark = pytest.mark.cluster


@pytest.fixture(autouse=True)
def _stack(operator, gateway):
    """Every test here needs the operator and the gateway running."""


class Traffic:
    """Requests at a steady pace from a background thread (pacing, not synchronisation)."""

    def __init__(self, gateway, key: str, every: float = 0.1):
        self.gateway, self.key, self.every = gateway, key, every
        self.statuses: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.statuses.append(self.gateway.chat(self.key, tokens=16)[0])
            self._stop.wait(self.every)

    def __enter__(self) -> "Traffic":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(10)


def gauges(operator, metric: str) -> dict[tuple, float]:
    out = {}
    for family in text_string_to_metric_families(httpx.get(operator.metrics_url, timeout=5).text):
        for sample in family.samples:
            if sample.name == metric:
                out[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def gauge_of(operator, metric: str, **labels) -> float | None:
    for key, value in gauges(operator, metric).items():
        if all(dict(key).get(k) == v for k, v in labels.items()):
            return value
    return None


def events_of(kube, name: str) -> list[str]:
    return kube(
        "get", "events", "--field-selector", f"involvedObject.name={name}", "-o", "jsonpath={.items[*].reason}"
    ).stdout.split()


def test_forecast_under_traffic_survives_an_operator_restart(kube, gateway, operator, redis_client):
    # A month budget the traffic below would spend in minutes: at risk long before it resets.
    kube.apply(quota_manifest("pool", tokensPerMonth=60_000))
    kube.apply(key_manifest("burner", quotaRef="pool", limits={"tokensPerMonth": 50_000}))
    key = wait_until("the generated Secret", lambda: kube.secret_key("burner-api-key"), 30)
    wait_until("accepted", lambda: gateway.chat(key)[0] == 200, 30)
    subject = contract.key_subject(kube.ns, "burner")

    with Traffic(gateway, key) as traffic:
        # At least one minute of history is needed: no forecast before, one soon after.
        forecast = wait_until(
            "status.forecast with exhaustsAt",
            lambda: (f := (kube.get("atlaskey", "burner")["status"].get("forecast") or {})).get("exhaustsAt") and f,
            150,
            0.5,
        )
        assert forecast["tokensPerHour"] > 0 and forecast["basis"].startswith("last ")
        risk = wait_until(
            "BudgetAtRisk=True",
            lambda: (c := kube.condition("atlaskey", "burner", "BudgetAtRisk")).get("status") == "True" and c,
            15,
        )
        assert risk["reason"] == "TokensPerMonthAtRisk" and "tokensPerMonth (50000)" in risk["message"]
        wait_until("the BudgetAtRisk Event", lambda: "BudgetAtRisk" in events_of(kube, "burner"), 15)
        assert kube.columns("atlaskey", "burner")["EXHAUSTS"] == forecast["exhaustsAt"]
        wait_until(
            "the quota's forecast",
            lambda: (kube.get("atlasquota", "pool")["status"].get("forecast") or {}).get("tokensPerHour", 0) > 0,
            30,
        )
        wide = kube("get", "atlasquotas", "pool", "-o", "wide").stdout.splitlines()
        assert "TOKENS/HOUR" in wide[0] and "EXHAUSTS" in wide[0]
        seconds = wait_until(
            "the exhaustion gauge",
            lambda: gauge_of(
                operator,
                "atlas_budget_exhaustion_seconds",
                namespace=kube.ns,
                name="burner",
                kind="AtlasKey",
                budget="tokensPerMonth",
            ),
            15,
        )
        assert 0 < seconds < 31 * 86400
        assert gauge_of(operator, "atlas_key_info", namespace=kube.ns, name="burner", quota="pool") == 1
        assert len(contract.decode_history(redis_client.get(contract.history_key(subject)))) >= 2  # persisted

        operator.stop()
        operator.start()
        # From scratch a forecast needs a minute of history; the restarted operator reads it
        # back from Redis, so its gauge is there within a few cycles.
        wait_until(
            "a forecast from the restarted operator",
            lambda: gauge_of(
                operator, "atlas_budget_burn_tokens_per_hour", namespace=kube.ns, name="burner", kind="AtlasKey"
            ),
            20,
        )
        status = kube.get("atlaskey", "burner")["status"]
        assert status["forecast"].get("exhaustsAt")  # never dropped by the restart
        assert kube.condition("atlaskey", "burner", "BudgetAtRisk")["status"] == "True"
    assert traffic.statuses.count(200) > 100
    assert events_of(kube, "burner").count("BudgetAtRisk") == 1  # posted when it turned True, once


def test_quiet_key_gets_no_forecast(kube, gateway):
    kube.apply(key_manifest("idle", limits={"tokensPerDay": 1000}))
    key = wait_until("the generated Secret", lambda: kube.secret_key("idle-api-key"), 30)
    wait_until("Ready", lambda: kube.condition("atlaskey", "idle").get("status") == "True", 30)
    assert key
    status = kube.get("atlaskey", "idle")["status"]
    assert "forecast" not in status and not kube.condition("atlaskey", "idle", "BudgetAtRisk")


def test_rotation_grace_keeps_both_keys_then_only_the_new(kube, gateway, redis_client):
    first, second = "sk-grace-first-0123456789", "sk-grace-second-012345678"
    h1, h2 = contract.hash_api_key(first), contract.hash_api_key(second)
    kube.apply(secret_manifest("graced", first, atlaskey="graced"))
    kube.apply(key_manifest("graced", secretName="graced", rotationGracePeriod="8s"))
    wait_until("first key accepted", lambda: gateway.chat(first)[0] == 200, 30)

    kube.apply(secret_manifest("graced", second, atlaskey="graced"))
    wait_until(
        "the new key is served", lambda: redis_client.hget(contract.KEY_INDEX, f"{kube.ns}/graced") == h2.encode(), 15
    )
    # During the grace: both configs in Redis, one usage identity, both keys work.
    old, new = (contract.KeyConfig.decode(redis_client.get(contract.key_config_key(h))) for h in (h1, h2))
    assert (old.namespace, old.name) == (new.namespace, new.name) == (kube.ns, "graced")
    assert redis_client.pttl(contract.key_config_key(h1)) > 0
    previous = wait_until(
        "status shows both key ids",
        lambda: (p := kube.get("atlaskey", "graced")["status"].get("previousKey")) and p,
        10,
    )
    assert previous["keyId"] == h1[:8] and kube.get("atlaskey", "graced")["status"]["keyId"] == h2[:8]
    assert gateway.chat(first)[0] == 200 and gateway.chat(second)[0] == 200
    # kopf posts Events in the background, after the status patch: wait for it, don't race it
    wait_until("KeyRotated Event", lambda: "KeyRotated" in events_of(kube, "graced"), 10)

    # After it: only the new key.
    wait_until("the old config gone", lambda: not redis_client.exists(contract.key_config_key(h1)), 20)
    wait_until("the old key refused", lambda: gateway.chat(first)[0] in (401, 403), 5)
    assert gateway.chat(second)[0] == 200
    wait_until("previousKey cleared", lambda: "previousKey" not in kube.get("atlaskey", "graced")["status"], 10)
    wait_until("PreviousKeyRetired Event", lambda: "PreviousKeyRetired" in events_of(kube, "graced"), 10)
    assert redis_client.hget(contract.PREVIOUS_KEY_INDEX, f"{kube.ns}/graced") is None
