"""Fixtures of the images tier: a Docker engine (hack/docker.sh), the images built from this
checkout (hack/images.sh), and the chart's default pod specs (helm template)."""

from __future__ import annotations

import subprocess

import pytest

from atlas_devstack.controlplane import ControlPlane
from atlas_devstack.tools import REPO_ROOT, missing_tools
from tests.chart.helmlib import Helm, Manifests, require_tool
from tests.fixtures.ci import in_ci
from tests.fixtures.cluster import _reporter_log

from . import containers
from .containers import PodSpec

TARGETS = ("gateway", "operator", "mock-upstream")


def _unavailable(msg: str) -> None:
    if in_ci():
        pytest.fail(msg, pytrace=False)  # nothing may be skipped in CI
    pytest.skip(msg)


@pytest.fixture(scope="session")
def docker_cli(docker_engine: str) -> str:
    """The CLI of the session's engine (tests/fixtures/daemons.py), for containers.docker()."""
    containers.DOCKER = docker_engine
    return docker_engine


@pytest.fixture(scope="session")
def images(docker_cli, request) -> dict[str, str]:
    """target -> image reference, built from this checkout (warm: Docker's layer cache)."""
    log = _reporter_log(request.config)
    res = subprocess.run(
        ["bash", str(REPO_ROOT / "hack" / "images.sh"), "build"], capture_output=True, text=True, timeout=1800
    )
    for line in res.stderr.splitlines():
        if line.startswith("[images]"):
            log(line)
    assert res.returncode == 0, f"hack/images.sh failed:\n{res.stderr[-4000:]}"
    tags = subprocess.run(
        ["bash", str(REPO_ROOT / "hack" / "images.sh"), "tags"], capture_output=True, text=True, check=True
    ).stdout.split()
    return dict(zip(TARGETS, tags))


@pytest.fixture(scope="session")
def chart(tmp_path_factory) -> Manifests:
    """The chart rendered with its default values (only the required upstream URL set)."""
    helm = Helm(require_tool("helm"), tmp_path_factory.mktemp("helm-home"))
    return helm.render(sets=["gateway.upstream.url=http://upstream:8000"])


@pytest.fixture(scope="session")
def pod_specs(chart: Manifests) -> dict[str, PodSpec]:
    return {
        component: PodSpec.of(chart.one("Deployment", f"-{component}"), component)
        for component in ("gateway", "operator")
    }


@pytest.fixture(scope="module")
def own_control_plane(request):
    """A private kube-apiserver + etcd: the operator runs cluster-wide (the chart's default), so
    it must not see other tiers' leftover keys."""
    missing = missing_tools()
    if missing:
        _unavailable(f"{', '.join(missing)} not built: run `make tools` (bash hack/tools/build.sh)")
    with ControlPlane(log=_reporter_log(request.config)) as cp:
        yield cp
