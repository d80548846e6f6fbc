"""kind-config.yaml and hack/kind.mk fit together and with the chart (no Docker/kind needed)."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import yaml

from atlas_devstack.tools import REPO_ROOT

from .helmlib import ci_values


def test_kind_config_maps_the_gateway_nodeport_to_loopback():
    cfg = yaml.safe_load((REPO_ROOT / "kind-config.yaml").read_text())
    assert cfg["kind"] == "Cluster" and cfg["apiVersion"] == "kind.x-k8s.io/v1alpha4"
    (node,) = cfg["nodes"]
    assert node["role"] == "control-plane"
    values = yaml.safe_load(ci_values("kind").read_text())
    service = values["gateway"]["service"]
    assert service["type"] == "NodePort"
    (mapping,) = node["extraPortMappings"]
    assert mapping["containerPort"] == service["nodePort"]
    assert mapping["hostPort"] == 8080 and mapping["listenAddress"] == "127.0.0.1"
    # Images come from `kind load`, never from a registry.
    for component in ("gateway", "operator"):
        assert values[component]["image"]["pullPolicy"] == "Never"


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_kind_targets_use_the_files_that_exist():
    res = subprocess.run(
        ["make", "-n", "kind-up", "images-load", "helm-install"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    out = res.stdout
    for path in ("kind-config.yaml", "hack/images.sh", "charts/atlas/ci/kind-values.yaml", "charts/atlas"):
        assert path in out, f"{path} not used by hack/kind.mk"
        assert (REPO_ROOT / path).exists(), path
    # `make images` tags the images with the chart's default references, so kind gets exactly
    # those and helm-install needs no image override.
    tags = subprocess.run(
        ["bash", "hack/images.sh", "tags"], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    assert f"kind load docker-image --name atlas {tags[0]} {tags[1]}" in out
    assert ".image." not in out
