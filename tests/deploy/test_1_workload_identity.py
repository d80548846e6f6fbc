"""A pod calls Atlas with its projected ServiceAccount token (audience atlas): examples/
07-workload-identity applied as written (docs/workload-identity.md's walkthrough), only the
image swapped for one the node has (no registry here). The token authenticates as the AtlasKey
binding the ServiceAccount: usage, metrics and status show that key, never the token."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
import uuid

import yaml

from atlas_devstack.tools import REPO_ROOT

from .conftest import Cluster, wait_until

EXAMPLE = REPO_ROOT / "examples" / "07-workload-identity"
KEY, JOB, ACCOUNT = "nightly-summaries", "nightly-summaries", "batch-runner"


def test_a_job_calls_the_gateway_service_with_its_service_account_token(cluster: Cluster):
    namespace = f"jobs-{uuid.uuid4().hex[:6]}"
    cluster.kubectl("create", "namespace", namespace)
    objects = list(yaml.safe_load_all(cluster.kubectl("kustomize", str(EXAMPLE)).stdout))
    image = cluster.pods("gateway")[0]["spec"]["containers"][0]["image"]  # has python, like the example's
    job = next(o for o in objects if o["kind"] == "Job")
    container = job["spec"]["template"]["spec"]["containers"][0]
    container["image"], container["imagePullPolicy"] = image, "Never"
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["ATLAS_URL"] == f"http://atlas-gateway.{cluster.namespace}.svc:8080/v1", (
        "the example names the release's gateway Service"
    )
    assert (
        job["spec"]["template"]["spec"]["volumes"][0]["projected"]["sources"][0]["serviceAccountToken"]["audience"]
        == "atlas"
    )

    # the AtlasKey first, so that the Job's first request finds its binding
    key = next(o for o in objects if o["kind"] == "AtlasKey")
    account = next(o for o in objects if o["kind"] == "ServiceAccount")
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump_all([account, key]))
    cluster.kubectl("wait", "-n", namespace, "--for=condition=Ready", f"atlaskey/{KEY}", "--timeout=90s", timeout=100)
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(job))
    done = cluster.kubectl(
        "wait", "-n", namespace, "--for=condition=complete", f"job/{JOB}", "--timeout=180s", check=False, timeout=190
    )
    logs = cluster.kubectl("logs", "-n", namespace, f"job/{JOB}", check=False).stdout
    assert done.returncode == 0, f"the Job did not complete: {done.stderr}\n{logs}"
    assert "tokens used:" in logs

    # counted as the AtlasKey: its status and the gateway's metrics name it
    usage = wait_until(
        "the Job's request in the AtlasKey's usage",
        lambda: (
            (u := (cluster.json("get", "atlaskey", "-n", namespace, KEY).get("status") or {}).get("usage") or {}).get(
                "requestsToday"
            )
            == 1
            and u
        ),
        timeout=60,
    )
    assert usage["tokensToday"] > 0
    label = f'key="{namespace}/{KEY}"'
    scraped = ""
    for pod in cluster.running_pods("gateway"):
        with urllib.request.urlopen(f"http://{pod['status']['podIP']}:8080/metrics", timeout=10) as resp:
            scraped += resp.read().decode()
    assert any(line.startswith("atlas_gateway_requests_total{") and label in line for line in scraped.splitlines())

    # the same kind of token from the API server: accepted by the gateway, useless against the
    # API server itself (its audience is atlas), and refused once the ServiceAccount is gone
    token = cluster.kubectl("create", "token", ACCOUNT, "-n", namespace, "--audience", "atlas").stdout.strip()
    assert token not in scraped
    review = urllib.request.Request(
        cluster.apiserver_url() + "/apis/authentication.k8s.io/v1/selfsubjectreviews",
        method="POST",
        data=json.dumps({"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"}).encode(),
        headers={"authorization": f"Bearer {token}", "content-type": "application/json"},
    )
    try:
        urllib.request.urlopen(review, context=cluster.apiserver_ssl(), timeout=10)
        raise AssertionError("an Atlas token authenticated to the API server")
    except urllib.error.HTTPError as exc:
        assert exc.code == 401
    assert cluster.usage(token)["key"] == {
        "namespace": namespace,
        "name": KEY,
        "keyId": cluster.json("get", "atlaskey", "-n", namespace, KEY)["status"]["keyId"],
    }
    cluster.kubectl("delete", "serviceaccount", ACCOUNT, "-n", namespace)

    def refused() -> bool:
        try:
            cluster.usage(token)
        except urllib.error.HTTPError as exc:
            return exc.code == 401
        return False

    wait_until("the deleted ServiceAccount's token refused", refused, timeout=60)
    cluster.kubectl("delete", "namespace", namespace, "--wait=false")
