"""Every manifest the chart renders, and every example, goes through the real kube-apiserver's
validation and admission with `kubectl apply --dry-run=server` (nothing is stored)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from atlas_devstack.tools import REPO_ROOT

from .helmlib import CHART, CI_VALUES, Manifests

TESTDATA = Path(__file__).parent / "testdata"
EXAMPLES = sorted(p for p in (REPO_ROOT / "examples").iterdir() if re.match(r"\d\d-", p.name))


@pytest.fixture(scope="module")
def monitoring_crds(control_plane):
    """Stand-ins for the Prometheus Operator CRDs (see testdata/monitoring-crds.yaml)."""
    control_plane.kubectl("apply", "-f", TESTDATA / "monitoring-crds.yaml")
    control_plane.kubectl(
        "wait",
        "--for=condition=Established",
        "--timeout=60s",
        "crd/servicemonitors.monitoring.coreos.com",
        "crd/prometheusrules.monitoring.coreos.com",
    )


def ensure_namespaces(kubectl, names) -> None:
    for name in sorted(set(names)):
        if kubectl("get", "namespace", name, check=False).returncode != 0:
            kubectl("create", "namespace", name)


def dry_run(kubectl, manifests: str, *args: str) -> list[str]:
    res = kubectl("apply", "--dry-run=server", "--validate=strict", *args, "-f", "-", input=manifests, check=False)
    assert res.returncode == 0, res.stderr
    lines = [line for line in res.stdout.splitlines() if line.strip()]
    assert all(line.endswith("(server dry run)") for line in lines), res.stdout
    return lines


@pytest.mark.parametrize("values_file", [p.name for p in CI_VALUES])
def test_rendered_chart_passes_server_dry_run(helm, kubectl, namespace, monitoring_crds, values_file):
    objs = helm.render(CHART / "ci" / values_file, namespace=namespace)
    ensure_namespaces(kubectl, [o["metadata"]["namespace"] for o in objs if o["metadata"].get("namespace")])
    lines = dry_run(kubectl, objs.dump())
    assert len(lines) == len(objs), "\n".join(lines)


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_passes_server_dry_run(kubectl, namespace, example):
    has_overlays = (example / "overlays").is_dir()
    if has_overlays:
        overlays = sorted(p for p in (example / "overlays").iterdir() if p.is_dir())
        assert overlays
        for overlay in overlays:
            rendered = kubectl("kustomize", overlay).stdout
            objs = Manifests.parse(rendered)
            # Namespaces must exist for a dry run of the objects in them (nothing is stored).
            ensure_namespaces(kubectl, [o["metadata"]["namespace"] for o in objs if "namespace" in o["metadata"]])
            kinds = objs.kinds()
            assert {"AtlasKey", "AtlasQuota"} <= kinds, (overlay, kinds)
            dry_run(kubectl, rendered)
        return
    if (example / "kustomization.yaml").exists():
        rendered = kubectl("kustomize", example).stdout
    else:
        rendered = "\n---\n".join(p.read_text() for p in sorted(example.glob("*.yaml")))
    objs = Manifests.parse(rendered)
    assert "AtlasKey" in objs.kinds()
    lines = dry_run(kubectl, rendered, "--namespace", namespace)
    assert len(lines) == len(objs)


def test_gitops_overlays_patch_what_they_say():
    """The overlays differ the way examples/05-gitops-kustomize/README.md says."""
    import subprocess

    from atlas_devstack.tools import find_tool

    from .helmlib import require_tool

    require_tool("kubectl")
    root = REPO_ROOT / "examples" / "05-gitops-kustomize" / "overlays"

    def build(name):
        out = subprocess.run(
            [str(find_tool("kubectl")), "kustomize", str(root / name)], capture_output=True, text=True, check=True
        ).stdout
        return {(o["kind"], o["metadata"]["name"]): o for o in yaml.safe_load_all(out) if o}

    staging, prod = build("staging"), build("production")
    for objs, ns in ((staging, "chat-staging"), (prod, "chat-prod")):
        assert ("Namespace", ns) in objs
        for (kind, _), o in objs.items():
            if kind != "Namespace":
                assert o["metadata"]["namespace"] == ns
    assert staging[("AtlasQuota", "chat-platform")]["spec"]["limits"]["tokensPerDay"] == 100000
    assert staging[("AtlasKey", "chat-summarizer")]["spec"]["suspended"] is True
    assert "suspended" not in prod[("AtlasKey", "chat-summarizer")]["spec"]
    assert prod[("AtlasQuota", "chat-platform")]["spec"]["limits"]["tokensPerDay"] == 10000000
    assert prod[("AtlasKey", "chat-web")]["spec"]["limits"]["requestsPerSecond"] == 50
    # The strategic-merge patch replaced limits field by field, keeping the base's quotaRef.
    assert prod[("AtlasKey", "chat-web")]["spec"]["quotaRef"] == "chat-platform"


def test_an_invalid_example_edit_is_refused_with_the_field_named(kubectl, namespace):
    """What GitOps relies on: a wrong limit fails the sync instead of being applied."""
    doc = yaml.safe_load((REPO_ROOT / "examples" / "03-batch-sheddable" / "batch-key.yaml").read_text().split("---")[0])
    doc["spec"]["limits"]["burst"] = 5  # below requestsPerSecond: 20
    res = kubectl("apply", "--dry-run=server", "-n", namespace, "-f", "-", input=yaml.safe_dump(doc), check=False)
    assert res.returncode != 0
    assert "burst" in res.stderr
