"""Session-wide real processes for the operator's cluster tier: redis-server, the mock
upstream, the gateway and `python -m atlas_operator`, all on free 127.0.0.1 ports."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import redis as redislib

from atlas_devstack.mock_upstream import MockUpstreamProcess
from atlas_devstack.oidc_issuer import OidcIssuerProcess
from atlas_devstack.redis_server import RedisServer, free_port
from atlas_devstack.tools import find_tool

from .procs import Gateway, Kube, Proc, operator_proc


@pytest.fixture(scope="package")
def op_redis():
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="package")
def redis_client(op_redis):
    client = redislib.Redis.from_url(op_redis.url)
    yield client
    client.close()


@pytest.fixture(scope="package")
def upstream(tmp_path_factory):
    with MockUpstreamProcess(log_path=str(tmp_path_factory.mktemp("upstream") / "mock.log")) as mock:
        yield mock


@pytest.fixture(scope="package")
def gateway(op_redis, upstream, tmp_path_factory):
    port = free_port()
    proc = Proc(
        "atlas_gateway",
        {
            "ATLAS_REDIS_URL": op_redis.url,
            "ATLAS_UPSTREAM_URL": upstream.url,
            "ATLAS_HOST": "127.0.0.1",
            "ATLAS_PORT": str(port),
        },
        tmp_path_factory.mktemp("gateway") / "gateway.log",
        ready_url=f"http://127.0.0.1:{port}/readyz",
    )
    proc.start()
    try:
        yield Gateway(f"http://127.0.0.1:{port}")
    finally:
        proc.stop()


CHART = Path(__file__).resolve().parents[3] / "charts" / "atlas"


def chart_operator_rbac() -> str:
    """The operator's ClusterRole and binding exactly as the Helm chart renders them: one source
    of truth, so a verb the operator needs but the chart lacks fails these tests too."""
    rendered = subprocess.run(
        [
            str(find_tool("helm")),
            "template",
            "atlas",
            str(CHART),
            "--namespace",
            "atlas-system",
            "--show-only",
            "templates/operator/rbac.yaml",
            "--set",
            "gateway.upstream.url=http://upstream:8000",
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    return rendered.stdout


@pytest.fixture(scope="package")
def operator_kubeconfig(control_plane, tmp_path_factory) -> Path:
    """The operator runs as the chart's ServiceAccount holding only the chart's RBAC."""
    rbac = tmp_path_factory.mktemp("rbac") / "rbac.yaml"
    rbac.write_text(chart_operator_rbac())
    control_plane.kubectl("apply", "-f", str(rbac))
    return control_plane.service_account_kubeconfig(
        "atlas-system", "atlas-operator", tmp_path_factory.mktemp("sa") / "kubeconfig"
    )


@pytest.fixture(scope="package")
def oidc_issuer(tmp_path_factory):
    """A real OIDC issuer the operator trusts (User and Group subjects)."""
    with OidcIssuerProcess(log_path=str(tmp_path_factory.mktemp("oidc") / "issuer.log")) as issuer:
        yield issuer


@pytest.fixture(scope="package")
def operator(operator_kubeconfig, op_redis, oidc_issuer, tmp_path_factory):
    proc = operator_proc(
        operator_kubeconfig,
        op_redis.url,
        tmp_path_factory.mktemp("operator") / "operator.log",
        jwt_issuers=[oidc_issuer.jwt_config()],
    )
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture
def kube(kubectl, namespace) -> Kube:
    return Kube(kubectl, namespace)


@pytest.fixture
def record(capsys):
    """Print a latency measured by a test (one sample; the numbers go into docs/operator.md)."""

    def emit(name: str, seconds: float) -> None:
        with capsys.disabled():
            print(f"\n[measure] {name}: {seconds * 1000:.0f} ms")

    return emit
