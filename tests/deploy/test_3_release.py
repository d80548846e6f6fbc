"""The release's life cycle under traffic: `helm upgrade` with changed values, `helm uninstall`.

Runs last: the uninstall test removes the release."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid

import openai
import pytest

from atlas_devstack.deploy import CHART, DeployStack

from .conftest import CONNECTION_ERRORS, MODEL, PROPAGATION_SLACK_SECONDS, Cluster, Load, wait_until


def _release(cluster: Cluster) -> str:
    return cluster.env.get("ATLAS_RELEASE", "atlas")


def test_helm_upgrade_with_changed_values_under_traffic(cluster: Cluster, key_name: str):
    api_key = cluster.apply_key(key_name, {"limits": {"maxConcurrent": 64, "tokensPerDay": 10_000_000}})
    cluster.wait_gateways_settled(api_key)
    old_pods = {p["metadata"]["name"] for p in cluster.pods("gateway")}
    marker = uuid.uuid4().hex[:8]
    concurrency = 8
    # Two kinds of clients at once: raw ones (no retries: every error counts) and ones with the
    # openai SDK's default retries (what an application gets).
    with (
        Load(cluster, api_key, concurrency=concurrency) as load,
        Load(cluster, api_key, concurrency=2, max_retries=2) as app,
    ):
        load.wait_for_requests(100)
        wait_until("leases in use under load", lambda: cluster.live_leases(key_name)[0] > 0, timeout=30)
        t0 = time.monotonic()
        # Changed values that roll the gateway (new pod template) and reconfigure the operator.
        cluster.helm(
            "upgrade",
            _release(cluster),
            str(CHART),
            "--namespace",
            cluster.namespace,
            "--reuse-values",
            "--set",
            f"gateway.podLabels.rollout={marker}",
            "--set",
            "operator.usageIntervalSeconds=5",
            "--wait",
            "--timeout=300s",
        )
        rollout_seconds = time.monotonic() - t0
        pods = cluster.wait_ready("gateway", 2, timeout=120)
        rollout_end = time.monotonic()
        print(f"\nrollout: helm returned after {rollout_seconds:.1f}s, old pods gone after {rollout_end - t0:.1f}s")
        answered = load.result.total()
        load.wait_for_requests(answered + 50)
    result = load.result
    print(
        f"\nhelm upgrade under traffic ({rollout_seconds:.1f}s): raw clients {result.total()} requests, "
        f"{result.ok} ok, errors {result.errors}; SDK-default clients {app.result.total()} requests, "
        f"errors {app.result.errors}"
    )
    assert not ({p["metadata"]["name"] for p in pods} & old_pods), "the gateway did not roll"
    assert all(p["metadata"]["labels"].get("rollout") == marker for p in pods)
    env = {e["name"]: e.get("value") for e in cluster.pods("operator")[0]["spec"]["containers"][0]["env"]}
    assert env.get("ATLAS_USAGE_INTERVAL_SECONDS") == "5"
    # maxUnavailable 0 / maxSurge 1: no 5xx and no unanswered request. The rollout's bounds:
    # errors only while it runs, and only at the connection level (refused by, or a SYN lost
    # to, a pod whose endpoint kube-proxy has not removed yet; closed before any response),
    # which the SDK's default retries absorb: its clients see none.
    assert set(result.errors) <= CONNECTION_ERRORS, result.errors
    outside = result.errors_outside(t0, rollout_end + PROPAGATION_SLACK_SECONDS)
    # A few connection refusals also happen outside the rollout window (also in steady traffic
    # through the Service, never to a pod IP): bounded here, see docs/deploy.md.
    print(f"errors of requests sent outside the rollout window: {outside}")
    assert len(outside) <= 0.01 * result.total(), outside
    assert sum(result.errors.values()) <= 0.1 * result.total(), result.errors
    assert not app.result.errors, app.result.errors
    assert result.ok >= 150 and app.result.ok > 0
    live, entries = wait_until(
        "every lease released",
        lambda: (lambda lv: lv if lv[0] == 0 else None)(cluster.live_leases(key_name)),
        timeout=30,
    )
    print(f"leases left: live {live}, entries {entries}")


def test_deploy_up_again_repoints_the_running_install_at_a_host_upstream(cluster: Cluster, key_name: str):
    """`ATLAS_UPSTREAM_URL=... make deploy-up` on a running stack: same cluster, upgraded release,
    the gateway pods reach a server on this host at ATLAS_HOST_FROM_PODS."""
    if os.environ.get("ATLAS_DEPLOY_REUSE"):
        pytest.skip("ATLAS_DEPLOY_REUSE: keep the stack's own upstream")
    host = cluster.env["ATLAS_HOST_FROM_PODS"]
    with socket.socket() as s:
        s.bind((host, 0))
        port = s.getsockname()[1]
    mock = subprocess.Popen(
        [sys.executable, "-m", "atlas_devstack.mock_upstream", "--host", host, "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until(
            "the host's mock upstream",
            lambda: urllib.request.urlopen(f"http://{host}:{port}/healthz", timeout=2).status == 200,
            timeout=30,
        )
        apiserver_pid = (cluster.stack.cp_dir / "kube-apiserver.pid").read_text()
        revision = json.loads(cluster.helm("status", _release(cluster), "-n", cluster.namespace, "-o", "json").stdout)[
            "version"
        ]
        upstream = f"http://{host}:{port}"
        env = DeployStack(cluster.stack.dir, upstream_url=upstream).up()
        assert env["ATLAS_GATEWAY_URL"] == cluster.gateway_url
        assert (cluster.stack.cp_dir / "kube-apiserver.pid").read_text() == apiserver_pid  # same cluster
        status = json.loads(cluster.helm("status", _release(cluster), "-n", cluster.namespace, "-o", "json").stdout)
        assert status["version"] == revision + 1 and status["info"]["status"] == "deployed"
        assert not cluster.kubectl(
            "get",
            "deployment",
            "-n",
            cluster.namespace,
            "-o",
            "name",
            "-l",
            "app.kubernetes.io/name=atlas-mock-upstream",
        ).stdout.strip()

        api_key = cluster.apply_key(key_name, {"limits": {"tokensPerDay": 100000}})
        client = openai.OpenAI(
            base_url=cluster.gateway_url + "/v1",
            api_key=api_key,
            max_retries=0,
            default_headers={"x-mock-id": key_name},
        )
        client.chat.completions.create(model=MODEL, max_tokens=4, messages=[{"role": "user", "content": "x"}])
        with urllib.request.urlopen(f"{upstream}/_mock/requests/{key_name}", timeout=5) as resp:
            assert json.loads(resp.read())["count"] == 1  # served by the host's upstream
    finally:
        mock.terminate()
        mock.wait(10)


def test_helm_uninstall_keeps_crds_and_keys(cluster: Cluster, key_name: str):
    api_key = cluster.apply_key(key_name, {"limits": {"tokensPerDay": 1000}})
    cluster.helm("uninstall", _release(cluster), "--namespace", cluster.namespace, "--wait", "--timeout=300s")
    wait_until(
        "the release's pods gone",
        lambda: (
            not [
                p
                for p in cluster.pods()
                if p["metadata"].get("labels", {}).get("app.kubernetes.io/instance") == _release(cluster)
            ]
        ),
        timeout=180,
    )
    crds = cluster.kubectl("get", "crd", "-o", "name").stdout
    assert "atlaskeys.atlas.bugvanquisher.io" in crds and "atlasquotas.atlas.bugvanquisher.io" in crds
    keys = cluster.kubectl("get", "atlaskeys", "-A", "-o", "name").stdout.split()
    assert f"atlaskey.atlas.bugvanquisher.io/{key_name}" in keys
    secret = cluster.json("get", "secret", "-n", "default", f"{key_name}-api-key")
    assert secret["data"]["api-key"]
    # The bundled Redis's claim is retained too (counters survive a reinstall).
    claims = cluster.kubectl("get", "pvc", "-n", cluster.namespace, "-o", "name").stdout
    assert "data-" in claims
    assert api_key
