"""`kubectl atlas` beside the real operator and gateway: the key it reveals is the one the
gateway accepts, usage shows what the traffic used, and a rotation keeps both keys working for
the rotationGracePeriod, as the plugin reports. (tests/cluster/plugin covers the rest.)"""

from __future__ import annotations

import json

import pytest

from atlas_core import contract

from .procs import key_manifest, wait_until

pytestmark = pytest.mark.cluster


@pytest.fixture(autouse=True)
def _stack(operator, gateway):
    """Every test here needs the operator and the gateway running."""


def test_reveal_usage_and_rotate_with_a_grace_period(kube, gateway, kubectl_atlas):
    kube.apply(key_manifest("live", rotationGracePeriod="10m", limits={"tokensPerDay": 100000}))
    wait_until("the generated Secret", lambda: kube.secret_key("live-api-key"), 30)
    first = kubectl_atlas("key", "reveal", "live", "-n", kube.ns).stdout.strip()
    wait_until("the revealed key works", lambda: gateway.chat(first)[0] == 200, 30)
    for _ in range(3):
        assert gateway.chat(first, tokens=16)[0] == 200

    used = wait_until(
        "usage in status",
        lambda: (
            (kube.get("atlaskey", "live")["status"].get("usage") or {}).get("requestsToday", 0) >= 4
            and kube.get("atlaskey", "live")["status"]["usage"]["tokensToday"]
        ),
        30,
    )
    (row,) = json.loads(kubectl_atlas("usage", "-n", kube.ns, "-o", "json").stdout)
    assert (row["name"], row["budget"], row["used"], row["limit"]) == ("live", "tokensPerDay", used, 100000)

    report = kubectl_atlas("key", "rotate", "live", "-n", kube.ns).stdout
    second = kubectl_atlas("key", "reveal", "live", "-n", kube.ns).stdout.strip()
    assert second != first
    status = kube.get("atlaskey", "live")["status"]
    old_id, new_id = (contract.key_id_of(contract.hash_api_key(k)) for k in (first, second))
    assert status["keyId"] == new_id and status["previousKey"]["keyId"] == old_id
    assert f"key {old_id} replaced by {new_id}" in report
    assert f"accepts both until {status['previousKey']['expiresAt']} (rotationGracePeriod 10m)" in report
    wait_until("the new key works", lambda: gateway.chat(second)[0] == 200, 10)
    assert gateway.chat(first)[0] == 200, "the old key must keep working during the grace period"

    again = kubectl_atlas("key", "rotate", "live", "-n", kube.ns, check=False)
    assert again.returncode == 1 and "still in its rotationGracePeriod" in again.stderr
    assert gateway.chat(first)[0] == 200
