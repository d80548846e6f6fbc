"""A real `helm install` / `upgrade` / `uninstall` against a real kube-apiserver.

It gets its own control plane without CRDs (the session one has them applied by kubectl, and
helm refuses to adopt objects it did not create), so that the chart's first install is what
creates the CRDs, and uninstalling them with crds.keep=false does not pull them from under
the other tests. No controller-manager runs: Deployments make no pods, so there is no --wait.
"""

from __future__ import annotations

import pytest
import yaml

from atlas_devstack.controlplane import ControlPlane
from atlas_devstack.waiting import wait_for

from .helmlib import CHART, Helm, ci_values

NS = "atlas-system"
RELEASE = "atlas"
CRDS = (
    "atlaskeys.atlas.bugvanquisher.io",
    "atlasquotas.atlas.bugvanquisher.io",
    "atlaspricelists.atlas.bugvanquisher.io",
)


@pytest.fixture(scope="module")
def bare_plane(control_plane):  # depends on the session plane only for its skip/fail logic
    cp = ControlPlane(apply_crds=False)
    cp.start()
    try:
        yield cp
    finally:
        cp.stop()


def exists(cp, *args) -> bool:
    return cp.kubectl("get", *args, check=False).returncode == 0


def test_install_upgrade_uninstall(helm: Helm, bare_plane: ControlPlane):
    cp, kc = bare_plane, bare_plane.kubeconfig
    assert not any(exists(cp, "crd", c) for c in CRDS)

    # --- first install creates everything, CRDs included
    helm.run(
        "install",
        RELEASE,
        CHART,
        "--namespace",
        NS,
        "--create-namespace",
        "--values",
        ci_values("default"),
        kubeconfig=kc,
    )
    for kind, name in [
        ("deployment", "atlas-operator"),
        ("deployment", "atlas-gateway"),
        ("service", "atlas-gateway"),
        ("statefulset", "atlas-redis"),
        ("service", "atlas-redis"),
        ("serviceaccount", "atlas-operator"),
        ("serviceaccount", "atlas-gateway"),
        ("poddisruptionbudget", "atlas-gateway"),
        ("networkpolicy", "atlas-redis"),
    ]:
        assert exists(cp, kind, name, "-n", NS), f"{kind}/{name} not created"
    for kind in ("clusterrole", "clusterrolebinding"):
        assert exists(cp, kind, "atlas-operator")
    cp.kubectl("wait", "--for=condition=Established", "--timeout=60s", *(f"crd/{c}" for c in CRDS))
    for crd in CRDS:
        meta = yaml.safe_load(cp.kubectl("get", "crd", crd, "-o", "yaml").stdout)["metadata"]
        assert meta["annotations"]["helm.sh/resource-policy"] == "keep"
        assert meta["annotations"]["meta.helm.sh/release-name"] == RELEASE

    status = helm.run("status", RELEASE, "--namespace", NS, "-o", "yaml", kubeconfig=kc).stdout
    assert yaml.safe_load(status)["info"]["status"] == "deployed"
    notes = helm.run("get", "notes", RELEASE, "--namespace", NS, kubeconfig=kc).stdout
    assert "my-first-key-api-key" in notes and "jsonpath='{.data.api-key}'" in notes

    # The installed CRDs serve: a key can be created (and will outlive the release).
    cp.kubectl("create", "namespace", "keys")
    cp.kubectl(
        "apply",
        "-n",
        "keys",
        "-f",
        "-",
        input=yaml.safe_dump(
            {
                "apiVersion": "atlas.bugvanquisher.io/v1alpha1",
                "kind": "AtlasKey",
                "metadata": {"name": "survivor"},
                "spec": {"limits": {"tokensPerDay": 1000}},
            }
        ),
    )

    # --- upgrade to an autoscaled gateway: HPA appears, the Deployment leaves replicas to it
    helm.run("upgrade", RELEASE, CHART, "--namespace", NS, "--values", ci_values("ha-gateway-hpa"), kubeconfig=kc)
    assert exists(cp, "hpa", "atlas-gateway", "-n", NS)
    assert exists(cp, "pdb", "atlas-gateway", "-n", NS)

    # --- uninstall removes the release but keeps the CRDs and so every key
    helm.run("uninstall", RELEASE, "--namespace", NS, kubeconfig=kc)
    for kind, name in [
        ("deployment", "atlas-operator"),
        ("deployment", "atlas-gateway"),
        ("statefulset", "atlas-redis"),
        ("hpa", "atlas-gateway"),
    ]:
        wait_for(f"{kind}/{name} deleted", lambda: not exists(cp, kind, name, "-n", NS), 60, interval=0.1)  # noqa: B023 (run in this iteration)
    assert not exists(cp, "clusterrole", "atlas-operator")
    for crd in CRDS:
        assert exists(cp, "crd", crd), f"{crd} was deleted although crds.keep=true"
    assert exists(cp, "atlaskey", "survivor", "-n", "keys")

    # --- a reinstall adopts the kept CRDs (same release name and namespace)
    helm.run("install", RELEASE, CHART, "--namespace", NS, "--values", ci_values("default"), kubeconfig=kc)
    assert exists(cp, "atlaskey", "survivor", "-n", "keys"), "the kept CRDs were replaced, not adopted"
    # --- switching crds.keep off is an upgrade (helm patches adopted objects without removing
    # fields, so it has to be a change of the release); then uninstall removes the CRDs.
    helm.run(
        "upgrade",
        RELEASE,
        CHART,
        "--namespace",
        NS,
        "--values",
        ci_values("default"),
        "--set",
        "crds.keep=false",
        kubeconfig=kc,
    )
    for crd in CRDS:
        meta = yaml.safe_load(cp.kubectl("get", "crd", crd, "-o", "yaml").stdout)["metadata"]
        assert "helm.sh/resource-policy" not in (meta.get("annotations") or {})
    helm.run("uninstall", RELEASE, "--namespace", NS, kubeconfig=kc)
    for crd in CRDS:
        wait_for(f"crd {crd} deleted", lambda: not exists(cp, "crd", crd), 90, interval=0.1)  # noqa: B023 (run in this iteration)


def test_namespaced_install_creates_roles_only_where_watched(helm: Helm, bare_plane: ControlPlane):
    cp, kc = bare_plane, bare_plane.kubeconfig
    for ns in ("team-search", "team-batch"):
        if not exists(cp, "namespace", ns):
            cp.kubectl("create", "namespace", ns)
    helm.run(
        "install",
        "scoped",
        CHART,
        "--namespace",
        "scoped-system",
        "--create-namespace",
        "--values",
        ci_values("namespaced-rbac"),
        "--set",
        "crds.install=false",
        kubeconfig=kc,
    )
    try:
        for ns in ("team-search", "team-batch"):
            assert exists(cp, "role", "scoped-atlas-operator", "-n", ns)
            assert exists(cp, "rolebinding", "scoped-atlas-operator", "-n", ns)
        assert not exists(cp, "clusterrole", "scoped-atlas-operator")
    finally:
        helm.run("uninstall", "scoped", "--namespace", "scoped-system", kubeconfig=kc)
    assert not exists(cp, "role", "scoped-atlas-operator", "-n", "team-search")
