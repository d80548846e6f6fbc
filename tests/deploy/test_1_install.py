"""The install as `make deploy-up` leaves it: pods, identities, a key, the SDK, budgets."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import openai

from atlas_devstack.tools import REPO_ROOT

from .conftest import MODEL, Cluster, burst, wait_until


def test_every_pod_ready_with_zero_restarts(cluster: Cluster):
    pods = cluster.pods() + cluster.pods(namespace="kube-system")
    components = {p["metadata"]["labels"].get("app.kubernetes.io/component") for p in pods}
    assert {"gateway", "operator", "redis"} <= components
    assert len(cluster.pods("gateway")) == 2  # the chart's default replicas
    for pod in pods:
        name = pod["metadata"]["name"]
        assert cluster.ready(pod), f"{name} not Ready: {pod['status'].get('conditions')}"
        for status in pod["status"]["containerStatuses"]:
            assert status["restartCount"] == 0, f"{name}/{status['name']} restarted: {status}"
    # Scheduled on the node by the scheduler, networked by the CNI bridge.
    assert {p["spec"]["nodeName"] for p in pods} == {"atlas-node"}
    assert all(p["status"]["podIP"].startswith("10.244.0.") for p in pods)


def test_pods_run_with_the_charts_hardened_security_context(cluster: Cluster):
    for pod in cluster.pods("gateway") + cluster.pods("operator"):
        spec = pod["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["runAsUser"] == 10001
        for c in spec["containers"]:
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
            assert sc["capabilities"]["drop"] == ["ALL"]


def test_operator_reconciles_as_its_service_account(cluster: Cluster, key_name: str):
    """The operator pod's own credential is its ServiceAccount's token, and that identity is
    held to the chart's RBAC (allowed what reconciling needs, nothing more)."""
    pod = cluster.pods("operator")[0]
    sa = pod["spec"]["serviceAccountName"]
    token = cluster.kubectl(
        "exec",
        "-n",
        cluster.namespace,
        pod["metadata"]["name"],
        "--",
        "cat",
        "/var/run/secrets/kubernetes.io/serviceaccount/token",
    ).stdout.strip()
    review = urllib.request.Request(
        cluster.apiserver_url() + "/apis/authentication.k8s.io/v1/selfsubjectreviews",
        method="POST",
        data=json.dumps({"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"}).encode(),
        headers={"authorization": f"Bearer {token}", "content-type": "application/json"},
    )
    with urllib.request.urlopen(review, context=cluster.apiserver_ssl(), timeout=10) as resp:
        user = json.loads(resp.read())["status"]["userInfo"]
    assert user["username"] == f"system:serviceaccount:{cluster.namespace}:{sa}"

    as_sa = f"--as=system:serviceaccount:{cluster.namespace}:{sa}"
    can = lambda *a: cluster.kubectl("auth", "can-i", as_sa, *a, check=False).stdout.strip()  # noqa: E731
    assert can("patch", "atlaskeys.atlas.bugvanquisher.io/status", "-n", "default") == "yes"
    assert can("create", "secrets", "-n", "default") == "yes"
    assert can("delete", "deployments", "-n", cluster.namespace) == "no"
    assert can("create", "pods", "-n", "default") == "no"
    assert can("update", "customresourcedefinitions") == "no"

    # ... and with that identity it reconciles: generated Secret, status written.
    cluster.apply_key(key_name, {"limits": {"tokensPerDay": 1000}})
    status = cluster.json("get", "atlaskey", "-n", "default", key_name)["status"]
    assert len(status["keyId"]) == 8 and status["observedGeneration"] == 1


def test_openai_sdk_through_the_gateway_service_and_usage_in_kubectl(cluster: Cluster, key_name: str):
    api_key = cluster.apply_key(key_name, {"limits": {"requestsPerSecond": 20, "tokensPerDay": 100000}})
    client = openai.OpenAI(base_url=cluster.gateway_url + "/v1", api_key=api_key, max_retries=0)
    reply = client.chat.completions.create(
        model=MODEL, max_tokens=16, messages=[{"role": "user", "content": "hello from a pod"}]
    )
    assert reply.choices[0].message.content and reply.usage.total_tokens > 0
    streamed = list(
        client.chat.completions.create(
            model=MODEL, max_tokens=8, stream=True, messages=[{"role": "user", "content": "stream"}]
        )
    )
    assert any(chunk.choices and chunk.choices[0].delta.content for chunk in streamed)
    assert [m.id for m in client.models.list()]

    with_bad_key = openai.OpenAI(base_url=cluster.gateway_url + "/v1", api_key="sk-atlas-wrong", max_retries=0)
    try:
        with_bad_key.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}])
        raise AssertionError("an unknown key was served")
    except openai.AuthenticationError as exc:
        assert exc.status_code == 401

    # The operator writes usage back to .status; kubectl's printer column shows it.
    settled = cluster.usage(api_key)["usage"]["tokensToday"]
    assert settled > reply.usage.total_tokens

    def column() -> str | None:
        out = cluster.kubectl(
            "get",
            "atlaskeys",
            "-n",
            "default",
            key_name,
            "-o",
            "custom-columns=T:.status.usage.tokensToday",
            "--no-headers",
        ).stdout.strip()
        return out if out == str(settled) else None

    wait_until("tokensToday in kubectl get atlaskeys", column, timeout=60)
    table = cluster.kubectl("get", "atlaskeys", "-n", "default", key_name).stdout
    assert "TOKENS TODAY" in table and str(settled) in table


def test_200_concurrent_requests_over_both_replicas_never_exceed_a_budget_of_20(cluster: Cluster, key_name: str):
    # What one request costs once settled (the mock answers every request alike).
    probe_key = cluster.apply_key(key_name + "-probe", {"limits": {"tokensPerDay": 100000}})
    probe = burst(cluster, probe_key, 1)
    assert probe.ok == 1, probe.outcomes
    per_request = probe.tokens
    budget = 20 * per_request

    api_key = cluster.apply_key(key_name, {"limits": {"tokensPerDay": budget}})
    before = cluster.requests_by_pod()
    result = burst(cluster, api_key, 200)
    after = cluster.requests_by_pod()

    usage = cluster.usage(api_key)["usage"]
    print(
        f"\nbudget {budget} tokens ({per_request}/request): {result.outcomes}, "
        f"settled {usage['tokensToday']}, per pod {dict((k, after[k] - before.get(k, 0)) for k in after)}"
    )
    assert usage["tokensToday"] <= budget, "over budget"
    assert usage["tokensToday"] == result.tokens == result.ok * per_request
    assert 1 <= result.ok <= 20
    assert set(result.errors) <= {"429:insufficient_quota"}, result.errors
    assert result.total() == 200
    served = {pod: after[pod] - before.get(pod, 0) for pod in after}
    assert len(served) == 2 and all(n > 0 for n in served.values()), f"not spread: {served}"


def test_the_docs_walkthrough_as_written(cluster: Cluster):
    """docs/deploy.md's "from zero to a working key" block, run by bash as a user would; the
    `make deploy-up`/`deploy-down` lines are this session's own stack (up already, down at the end)."""
    doc = (REPO_ROOT / "docs" / "deploy.md").read_text()
    block = doc.split("<!-- walkthrough:start", 1)[1].split("<!-- walkthrough:end -->", 1)[0]
    script = block.split("```sh\n", 1)[1].rsplit("```", 1)[0]
    lines = script.splitlines()
    assert lines[0].startswith("make deploy-up") and lines[-1].startswith("make deploy-down")
    assert lines[1].startswith("source .deploy/env")
    body = "\n".join([f"source {cluster.stack.env_file}"] + lines[2:-1]) + "\n"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    env.pop("OPENAI_API_KEY", None)
    env.pop("OPENAI_BASE_URL", None)
    res = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", body], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=180
    )
    assert res.returncode == 0, res.stderr
    assert "CompletionUsage(" in res.stdout and "my-first-key" in res.stdout
    assert "Running" in res.stdout  # kubectl get pods
