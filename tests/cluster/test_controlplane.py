"""The cluster tier works: CRDs served by a real kube-apiserver, objects round-trip, the
status subresource, printer columns, short names, categories and RBAC behave as in a cluster."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.cluster

GROUP = "atlas.bugvanquisher.io"

KEY = """
apiVersion: atlas.bugvanquisher.io/v1alpha1
kind: AtlasKey
metadata:
  name: search
spec:
  quotaRef: team-search
  priority: Critical
  models: ["llama-3.1-8b-instruct", "qwen2.5-*"]
  limits:
    requestsPerSecond: 5
    burst: 10
    tokensPerDay: 200000
    tokensPerMonth: 5000000
"""

QUOTA = """
apiVersion: atlas.bugvanquisher.io/v1alpha1
kind: AtlasQuota
metadata:
  name: team-search
spec:
  limits:
    tokensPerMinute: 20000
    tokensPerDay: 1000000
"""


def get_json(kubectl, namespace: str, *what: str) -> dict:
    return json.loads(kubectl("get", *what, "-n", namespace, "-o", "json").stdout)


def test_crds_established_and_discoverable(kubectl):
    for plural in ("atlaskeys", "atlasquotas"):
        status = kubectl(
            "get", f"crd/{plural}.{GROUP}", "-o", 'jsonpath={.status.conditions[?(@.type=="Established")].status}'
        ).stdout
        assert status == "True", plural
    out = kubectl("api-resources", f"--api-group={GROUP}", "-o", "wide", "--no-headers").stdout
    rows = {line.split()[0]: line.split() for line in out.splitlines()}
    assert set(rows) == {"atlaskeys", "atlasquotas", "atlaspricelists"}
    assert rows["atlaskeys"][1:5] == ["ak", f"{GROUP}/v1alpha1", "true", "AtlasKey"]
    assert rows["atlasquotas"][1:5] == ["aq", f"{GROUP}/v1alpha1", "true", "AtlasQuota"]
    assert "atlas" in rows["atlaskeys"][-1] and "atlas" in rows["atlasquotas"][-1]


def test_create_and_read_both_kinds(kubectl, namespace):
    kubectl("apply", "-n", namespace, "-f", "-", input=KEY + "---" + QUOTA)
    key = get_json(kubectl, namespace, "atlaskey", "search")
    assert key["spec"]["quotaRef"] == "team-search"
    assert key["spec"]["limits"] == {
        "requestsPerSecond": 5,
        "burst": 10,
        "tokensPerDay": 200000,
        "tokensPerMonth": 5000000,
    }
    assert key["spec"]["models"] == ["llama-3.1-8b-instruct", "qwen2.5-*"]
    assert key["metadata"]["generation"] == 1
    quota = get_json(kubectl, namespace, "atlasquota", "team-search")
    assert quota["spec"]["limits"] == {"tokensPerMinute": 20000, "tokensPerDay": 1000000}


def test_status_subresource_and_generation(kubectl, namespace):
    kubectl("apply", "-n", namespace, "-f", "-", input=KEY)
    status = {
        "observedGeneration": 1,
        "keyId": "3f9a1c2b",
        "usage": {"tokensToday": 1234, "tokensThisMonth": 56789, "requestsToday": 42},
    }
    kubectl(
        "patch",
        "atlaskey",
        "search",
        "-n",
        namespace,
        "--subresource=status",
        "--type=merge",
        "-p",
        json.dumps({"status": status}),
    )
    key = get_json(kubectl, namespace, "atlaskey", "search")
    assert key["status"]["usage"]["tokensToday"] == 1234
    assert key["status"]["keyId"] == "3f9a1c2b"
    assert key["metadata"]["generation"] == 1, "a status write must not bump generation"

    # Through the main resource, status is ignored (only /status may write it).
    kubectl(
        "patch",
        "atlaskey",
        "search",
        "-n",
        namespace,
        "--type=merge",
        "-p",
        json.dumps({"status": {"keyId": "00000000"}}),
    )
    assert get_json(kubectl, namespace, "atlaskey", "search")["status"]["keyId"] == "3f9a1c2b"

    kubectl(
        "patch", "atlaskey", "search", "-n", namespace, "--type=merge", "-p", json.dumps({"spec": {"suspended": True}})
    )
    key = get_json(kubectl, namespace, "atlaskey", "search")
    assert key["metadata"]["generation"] == 2, "a spec change bumps generation"
    assert key["status"]["usage"]["tokensToday"] == 1234, "status survives a spec change"


def test_printer_columns(kubectl, namespace):
    kubectl("apply", "-n", namespace, "-f", "-", input=KEY + "---" + QUOTA)
    kubectl(
        "patch",
        "atlaskey",
        "search",
        "-n",
        namespace,
        "--subresource=status",
        "--type=merge",
        "-p",
        json.dumps({"status": {"usage": {"tokensToday": 1234, "tokensThisMonth": 56789}}}),
    )
    kubectl(
        "patch",
        "atlasquota",
        "team-search",
        "-n",
        namespace,
        "--subresource=status",
        "--type=merge",
        "-p",
        json.dumps({"status": {"keys": 1, "usage": {"tokensToday": 77}}}),
    )

    header, row = kubectl("get", "atlaskeys", "-n", namespace).stdout.splitlines()
    for column in ("NAME", "QUOTA", "PRIORITY", "TOKENS TODAY", "TOKENS/DAY", "TOKENS THIS MONTH", "READY", "AGE"):
        assert column in header, (column, header)
    assert row.split()[:6] == ["search", "team-search", "Critical", "1234", "200000", "56789"]

    header, row = kubectl("get", "atlasquotas", "-n", namespace).stdout.splitlines()
    for column in ("NAME", "KEYS", "TOKENS TODAY", "TOKENS/DAY", "TOKENS THIS MONTH", "READY", "AGE"):
        assert column in header, (column, header)
    assert row.split()[:4] == ["team-search", "1", "77", "1000000"]


def test_short_names_and_category(kubectl, namespace):
    kubectl("apply", "-n", namespace, "-f", "-", input=KEY + "---" + QUOTA)
    expected = {f"atlaskey.{GROUP}/search", f"atlasquota.{GROUP}/team-search"}
    by_short = kubectl("get", "ak,aq", "-n", namespace, "-o", "name").stdout.split()
    by_category = kubectl("get", "atlas", "-n", namespace, "-o", "name").stdout.split()
    assert set(by_short) == expected
    assert set(by_category) == expected


def test_rbac_is_enforced_for_other_identities(control_plane, kubectl, namespace, tmp_path):
    kubectl("apply", "-n", namespace, "-f", "-", input=KEY)
    user_cfg = control_plane.user_kubeconfig("alice", ["atlas-readers"], tmp_path / "alice")
    sa_cfg = control_plane.service_account_kubeconfig(namespace, "atlas-operator", tmp_path / "sa")

    denied = kubectl("get", "atlaskeys", "-n", namespace, kubeconfig=user_cfg, check=False)
    assert denied.returncode != 0 and "forbidden" in denied.stderr.lower()
    assert 'User "alice"' in denied.stderr

    kubectl("create", "role", "atlas-read", "-n", namespace, "--verb=get,list", f"--resource=atlaskeys.{GROUP}")
    kubectl(
        "create",
        "rolebinding",
        "readers",
        "-n",
        namespace,
        "--role=atlas-read",
        "--group=atlas-readers",
        f"--serviceaccount={namespace}:atlas-operator",
    )
    for cfg in (user_cfg, sa_cfg):
        names = kubectl("get", "atlaskeys", "-n", namespace, "-o", "name", kubeconfig=cfg).stdout.split()
        assert names == [f"atlaskey.{GROUP}/search"]
    # The grant is exactly get/list on atlaskeys: quotas stay forbidden.
    assert kubectl("get", "atlasquotas", "-n", namespace, kubeconfig=sa_cfg, check=False).returncode != 0
