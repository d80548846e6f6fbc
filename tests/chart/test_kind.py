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
    res = subprocess.run(["make", "-n", "-f", "hack/kind.mk", "kind-up", "images-load", "helm-install"],
                         cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    out = res.stdout
    for path in ("kind-config.yaml", "gateway/Dockerfile", "operator/Dockerfile",
                 "charts/atlas/ci/kind-values.yaml", "charts/atlas"):
        assert path in out, f"{path} not used by hack/kind.mk"
        assert (REPO_ROOT / path).exists(), path
    assert "kind load docker-image --name atlas atlas-gateway:dev atlas-operator:dev" in out
    assert "--set gateway.image.tag=dev" in out and "--set operator.image.tag=dev" in out
