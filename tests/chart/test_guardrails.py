"""The chart's guardrails (values `guardrails`, docs/guardrails.md) on the real API server: its
ValidatingAdmissionPolicies refuse what they should with a message naming the field, admit the
rest, warn instead in Warn mode; its aggregated ClusterRoles reach Kubernetes' view and edit roles
(through kube-controller-manager's aggregation controller) and grant exactly what they say."""

from __future__ import annotations

import json
import secrets
import subprocess
from functools import partial
from pathlib import Path

import pytest
import yaml

from atlas_devstack.processes import stop_group
from atlas_devstack.tools import find_tool
from atlas_devstack.waiting import wait_for

from .helmlib import CHART, Helm, ci_values, require_tool

pytestmark = pytest.mark.cluster
API = "atlas.bugvanquisher.io/v1alpha1"


def render(helm: Helm, release: str, values: dict, tmp: Path, *templates: str) -> str:
    path = tmp / f"{release}.yaml"
    path.write_text(yaml.safe_dump(values))
    args = [
        "template",
        release,
        CHART,
        "--namespace",
        "atlas-system",
        "--values",
        ci_values("default"),
        "--values",
        path,
    ]
    for template in templates:
        args += ["--show-only", f"templates/guardrails/{template}"]
    return helm.run(*args).stdout


def manifest(kind: str, name: str, **spec) -> str:
    return json.dumps({"apiVersion": API, "kind": kind, "metadata": {"name": name}, "spec": spec})


@pytest.fixture(scope="module")
def policies(helm, control_plane, tmp_path_factory):
    """The chart's policies for this module's namespaces only (their labels carry a random tag,
    so no other test's namespace is ever matched); removed afterwards."""
    tag = secrets.token_hex(3)
    release = f"grd-{tag}"
    values = {
        "guardrails": {
            "admission": {
                "requireQuotaRef": {
                    "enabled": True,
                    "namespaceSelector": {"matchLabels": {"atlas-test/require-quota-ref": tag}},
                },
                "maxLimits": [
                    {
                        "name": "capped",
                        "namespaceSelector": {"matchLabels": {"atlas-test/capped": tag}},
                        "limits": {"tokensPerDay": 1000, "requestsPerSecond": 5},
                    }
                ],
            }
        }
    }
    rendered = render(helm, release, values, tmp_path_factory.mktemp("vap"), "admission-policies.yaml")
    control_plane.kubectl("apply", "-f", "-", input=rendered)
    try:
        yield tag
    finally:
        control_plane.kubectl("delete", "-f", "-", "--wait=false", input=rendered, check=False)


def labelled(kubectl, namespace: str, label: str, tag: str) -> str:
    kubectl("label", "namespace", namespace, f"{label}={tag}")
    return namespace


def apply(kubectl, namespace: str, text: str):
    return kubectl("apply", "-n", namespace, "-f", "-", input=text, check=False)


def refused(kubectl, namespace: str, text: str, probe: str) -> str:
    """The refusal of creating `text`, waiting (with a deadline) until the API server has loaded
    a fresh policy and binding; server-side dry runs, so that an attempt admitted before then
    leaves nothing behind."""
    res = wait_for(
        f"the policy refusing {probe}",
        lambda: (
            (r := kubectl("create", "--dry-run=server", "-n", namespace, "-f", "-", input=text, check=False)).returncode
            != 0
            and r
        ),
        30,
        interval=0.1,
        retry=(Exception,),
    )
    assert "ValidatingAdmissionPolicy" in res.stderr, res.stderr
    return res.stderr


def test_keys_must_name_a_quota_where_the_label_says_so(kubectl, namespace_factory, policies):
    strict = labelled(kubectl, namespace_factory(), "atlas-test/require-quota-ref", policies)
    err = refused(kubectl, strict, manifest("AtlasKey", "lone"), "a key without quotaRef")
    assert "spec.quotaRef: required in this namespace" in err and f"grd-{policies}-atlas-require-quota-ref" in err
    assert apply(kubectl, strict, manifest("AtlasKey", "shared", quotaRef="team")).returncode == 0
    # an UPDATE that drops the quotaRef is refused too
    res = apply(kubectl, strict, manifest("AtlasKey", "shared"))
    assert res.returncode != 0 and "spec.quotaRef: required" in res.stderr
    # namespaces without the label are untouched
    assert apply(kubectl, namespace_factory(), manifest("AtlasKey", "lone")).returncode == 0


def test_limits_above_their_cap_or_missing_are_refused(kubectl, namespace_factory, policies):
    ns = labelled(kubectl, namespace_factory(), "atlas-test/capped", policies)
    cap = {"tokensPerDay": 1000, "requestsPerSecond": 5}
    err = refused(kubectl, ns, manifest("AtlasKey", "big", limits={**cap, "tokensPerDay": 5000}), "a big key")
    assert "spec.limits.tokensPerDay: 5000 is above the cap of 1000" in err
    err = apply(kubectl, ns, manifest("AtlasKey", "fast", limits={**cap, "requestsPerSecond": 7.5})).stderr
    assert "spec.limits.requestsPerSecond: 7.5 is above the cap of 5.0" in err
    err = apply(kubectl, ns, manifest("AtlasKey", "unlimited")).stderr  # the API server names the first rule broken
    assert "spec.limits.requestsPerSecond: required in this namespace, at most 5.0" in err
    assert "unless the key names a quotaRef" in err
    err = apply(kubectl, ns, manifest("AtlasQuota", "open", limits={"requestsPerSecond": 1})).stderr
    assert "spec.limits.tokensPerDay: required in this namespace, at most 1000" in err and "quotaRef" not in err
    # within the caps (an integer where the schema says number included), or capped by its quota
    for ok in (
        manifest("AtlasQuota", "team", limits=cap),
        manifest("AtlasKey", "small", limits=cap),
        manifest("AtlasKey", "pooled", quotaRef="team"),
    ):
        res = apply(kubectl, ns, ok)
        assert res.returncode == 0, res.stderr
    res = apply(kubectl, ns, manifest("AtlasKey", "pooled-big", quotaRef="team", limits={"tokensPerDay": 2000}))
    assert res.returncode != 0 and "2000 is above the cap of 1000" in res.stderr


def test_warn_mode_admits_with_a_warning(helm, kubectl, control_plane, namespace_factory, tmp_path):
    tag = secrets.token_hex(3)
    values = {
        "guardrails": {
            "admission": {
                "actions": ["Warn"],
                "requireQuotaRef": {"enabled": True, "namespaceSelector": {"matchLabels": {"atlas-test/warn": tag}}},
            }
        }
    }
    rendered = render(helm, f"warn-{tag}", values, tmp_path, "admission-policies.yaml")
    control_plane.kubectl("apply", "-f", "-", input=rendered)
    try:
        ns = labelled(kubectl, namespace_factory(), "atlas-test/warn", tag)
        res = wait_for(
            "the warning",
            lambda: (
                "Warning"
                in (
                    r := kubectl(
                        "create", "--dry-run=server", "-n", ns, "-f", "-", input=manifest("AtlasKey", "k"), check=False
                    )
                ).stderr
                and r
            ),
            30,
            interval=0.1,
            retry=(Exception,),
        )
        assert res.returncode == 0 and "spec.quotaRef: required in this namespace" in res.stderr
    finally:
        control_plane.kubectl("delete", "-f", "-", "--wait=false", input=rendered, check=False)


@pytest.fixture
def aggregation(control_plane, tmp_path):
    """kube-controller-manager running only its ClusterRole aggregation controller (the control
    plane of this tier runs no controllers otherwise)."""
    require_tool("kube-controller-manager")
    log = tmp_path / "kcm.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [
                str(find_tool("kube-controller-manager")),
                f"--kubeconfig={control_plane.kubeconfig}",
                "--controllers=clusterrole-aggregation",
                "--leader-elect=false",
                "--secure-port=0",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield proc
    finally:
        stop_group(proc.pid, timeout=10)
        proc.wait(5)


def test_view_and_edit_roles_cover_atlas_objects(
    helm, kubectl, control_plane, namespace, tmp_path, aggregation, kubectl_atlas
):
    release = f"agg-{secrets.token_hex(3)}"
    rendered = render(helm, release, {"guardrails": {"aggregatedRoles": True}}, tmp_path, "aggregated-roles.yaml")
    control_plane.kubectl("apply", "-f", "-", input=rendered)
    try:

        def aggregated(role: str, verb: str) -> bool:
            rules = json.loads(kubectl("get", "clusterrole", role, "-o", "json").stdout).get("rules") or []
            return any("atlaskeys" in r.get("resources", ()) and verb in r.get("verbs", ()) for r in rules)

        for role, verb in (("view", "list"), ("edit", "list"), ("edit", "create"), ("admin", "delete")):
            wait_for(
                f"{role} aggregating {verb} atlaskeys",
                partial(aggregated, role, verb),
                30,
                interval=0.1,
                retry=(Exception,),
            )
        assert not aggregated("view", "create")

        for user, role in (("viewer", "view"), ("editor", "edit")):
            kubectl("create", "rolebinding", user, f"--clusterrole={role}", f"--user={user}", "-n", namespace)
        viewer = control_plane.user_kubeconfig("viewer", path=tmp_path / "viewer", namespace=namespace)
        editor = control_plane.user_kubeconfig("editor", path=tmp_path / "editor", namespace=namespace)

        def can(kubeconfig: Path, *what: str) -> bool:
            return kubectl("auth", "can-i", *what, "-n", namespace, kubeconfig=kubeconfig, check=False).returncode == 0

        assert can(viewer, "list", "atlaskeys") and can(viewer, "watch", "atlaspricelists")
        assert not can(viewer, "create", "atlaskeys") and not can(viewer, "get", "secrets")
        assert can(editor, "create", "atlaskeys") and can(editor, "delete", "atlasquotas")
        assert not can(editor, "patch", "atlaskeys", "--subresource=status"), "status is the operator's alone"

        # as a viewer uses them: kubectl atlas usage works, key reveal is refused saying why
        kubectl("apply", "-n", namespace, "-f", "-", input=manifest("AtlasKey", "k", limits={"tokensPerDay": 10}))
        assert "tokensPerDay" in kubectl_atlas("usage", kubeconfig=viewer).stdout
        res = kubectl_atlas("key", "reveal", "k", kubeconfig=viewer, check=False)
        assert res.returncode == 1 and 'User "viewer" cannot get resource "secrets"' in res.stderr
    finally:
        control_plane.kubectl("delete", "-f", "-", "--wait=false", input=rendered, check=False)
