"""The images, built from this checkout, run the way the chart's default values run them: UID
10001 without a passwd entry, read-only root filesystem, every capability dropped, no privilege
escalation, the chart's emptyDir volumes as tmpfs, its memory limits, its env. The operator gets
in-cluster credentials exactly as a pod does (a ServiceAccount token under
/var/run/secrets/kubernetes.io/serviceaccount, KUBERNETES_SERVICE_HOST/PORT) bound by the
chart's RBAC, and reconciles against a real kube-apiserver; the gateway serves the key it
wrote, to the official openai SDK, through the mock-upstream image.

Needs a Docker engine (hack/docker.sh starts Debian's, as root) and `make tools`.
"""

from __future__ import annotations

import base64
import json

import openai
import pytest
import yaml

from atlas_devstack.redis_server import free_port
from atlas_devstack.stack import http
from atlas_devstack.waiting import wait_for

from .containers import Container, docker

RELEASE_NAMESPACE = "atlas-system"
CRASH_MARKERS = ("Traceback", "getpwuid", "Read-only file system", "PermissionError")


def _ok(url: str) -> bool:
    try:
        return http("GET", url, timeout=2)[0] == 200
    except OSError:
        return False


def wait_ready(container: Container, url: str, timeout: float = 60) -> None:
    """Wait until url answers 200; fail at once if the container exits, with its log either way."""

    def exited() -> str | None:
        return None if container.running() else f"{container.image} exited {container.state()['ExitCode']}"

    def error(message: str) -> AssertionError:
        return AssertionError(f"{message}\n{container.logs()[-4000:]}")

    wait_for(f"{url} from {container.image}", lambda: _ok(url), timeout, interval=0.1, failed=exited, error=error)


def assert_healthy(container: Container) -> None:
    info = container.inspect()
    state = info["State"]
    assert state["Running"] and info["RestartCount"] == 0 and not state["OOMKilled"], state
    logs = container.logs()
    found = [m for m in CRASH_MARKERS if m in logs]
    assert not found, f"{container.image} logged {found}:\n{logs[-4000:]}"


def test_the_tags_are_the_references_the_charts_defaults_use(images, pod_specs):
    """The chart needs no image override: `make images` tags with its default references."""
    assert pod_specs["gateway"].image == images["gateway"]
    assert pod_specs["operator"].image == images["operator"]


def test_the_chart_runs_both_planes_hardened(pod_specs):
    """What the docker flags below stand for; a weaker chart would make these tests weaker."""
    for spec in pod_specs.values():
        flags = spec.docker_flags()
        assert flags[flags.index("--user") + 1] == "10001:10001"
        for flag in ("--read-only", "no-new-privileges", "--memory"):
            assert flag in flags, flag
        assert flags[flags.index("--cap-drop") + 1] == "ALL"
        assert any(f.startswith("/tmp:") for f in flags), "the chart's /tmp volume"


# Each product image holds its own process and nothing else: no devstack, no other plane, no pip.
HOLDS = {
    "gateway": (
        {
            "atlas_core",
            "atlas_gateway",
            "uvicorn",
            "uvloop",
            "httptools",
            "aiohttp",
            "redis",
            "hiredis",
            "prometheus_client",
        },
        {
            "atlas_operator",
            "atlas_devstack",
            "kopf",
            "kubernetes",
            "benchmarks",
            "tests",
            "pip",
            "setuptools",
            "openai",
            "httpx",
            "yaml",
            "watchfiles",
            "fastapi",
            "pydantic",
        },
    ),
    "operator": (
        {"atlas_core", "atlas_operator", "kopf", "kubernetes", "redis", "prometheus_client"},
        {"atlas_gateway", "atlas_devstack", "fastapi", "uvicorn", "benchmarks", "tests", "pip", "setuptools", "openai"},
    ),
    "mock-upstream": (
        {"atlas_devstack", "uvicorn", "uvloop", "httptools"},
        {"atlas_operator", "kopf", "kubernetes", "pip"},
    ),
}


@pytest.mark.parametrize("target", sorted(HOLDS))
def test_an_image_installs_only_what_its_process_needs(images, target):
    present, absent = HOLDS[target]
    probe = (
        "import importlib.util, json, sys; "
        "print(json.dumps({m: importlib.util.find_spec(m) is not None for m in sys.argv[1:]}))"
    )
    res = docker(
        "run",
        "--rm",
        "--network",
        "none",
        "--read-only",
        "--user",
        "10001:10001",
        "--cap-drop",
        "ALL",
        "--entrypoint",
        "python",
        images[target],
        "-c",
        probe,
        *sorted(present | absent),
    )
    found = json.loads(res.stdout)
    assert {m for m in present if not found[m]} == set(), f"{target} lacks what it runs"
    assert {m for m in absent if found[m]} == set(), f"{target} holds what it never runs"
    # ...and no console script of another plane that would only fail on import.
    scripts = docker(
        "run", "--rm", "--network", "none", "--entrypoint", "ls", images[target], "/opt/atlas/bin"
    ).stdout.split()
    others = {
        "gateway": {"atlas-operator"},
        "operator": {"atlas-gateway"},
        "mock-upstream": {"atlas-gateway", "atlas-operator"},
    }[target] | {"kubectl-atlas"}
    assert not others & set(scripts), scripts


# The modules each image's process may import at start-up or later: a dependency missing from
# the plane's extra shows here as an ImportError, not as a CrashLoopBackOff on a cluster.
IMPORTS = {"gateway": "atlas_gateway", "operator": "atlas_operator", "mock-upstream": "atlas_devstack.mock_upstream"}


@pytest.mark.parametrize("target", sorted(IMPORTS))
def test_every_module_of_the_plane_imports_in_its_image(images, target):
    probe = (
        "import importlib, pkgutil, sys; root = importlib.import_module(sys.argv[1]); "
        "names = [m.name for m in pkgutil.walk_packages(getattr(root, '__path__', []), root.__name__ + '.')]; "
        "[importlib.import_module(n) for n in names]; print(len(names))"
    )
    res = docker(
        "run",
        "--rm",
        "--network",
        "none",
        "--read-only",
        "--user",
        "10001:10001",
        "--cap-drop",
        "ALL",
        "--tmpfs",
        "/tmp",
        "--entrypoint",
        "python",
        images[target],
        "-c",
        probe,
        IMPORTS[target],
        check=False,
    )
    assert res.returncode == 0, f"{target}: {res.stderr[-2000:]}"


@pytest.mark.parametrize("workers", [1, 2], ids=["1-worker", "2-workers"])
def test_gateway_starts_and_answers_its_probes(images, pod_specs, redis_url, workers):
    """As the chart runs it; 2 workers also needs the writable /tmp (the workers' metrics snapshots)."""
    port = free_port()
    env = {
        "ATLAS_REDIS_URL": redis_url,
        "ATLAS_HOST": "127.0.0.1",
        "ATLAS_PORT": str(port),
        "ATLAS_WORKERS": str(workers),
        "ATLAS_UPSTREAM_URL": f"http://127.0.0.1:{free_port()}",
    }
    with Container.as_chart_runs(pod_specs["gateway"], env) as gateway:
        base = f"http://127.0.0.1:{port}"
        wait_ready(gateway, base + "/readyz")  # the readiness probe: Redis reachable
        assert _ok(base + "/healthz")  # the liveness probe
        status, body = http("GET", base + "/metrics")
        assert status == 200 and b"atlas_" in body
        status, body = http(
            "POST",
            base + "/v1/chat/completions",
            {"model": "m", "messages": []},
            headers={"authorization": "Bearer sk-atlas-unknown"},
        )
        assert status == 401 and json.loads(body)["error"]["code"] == "invalid_api_key"
        assert_healthy(gateway)


# ------------------------------------------------------------------ operator + gateway + mock


def _chart_operator_rbac(chart) -> str:
    """The operator's ServiceAccount, ClusterRole and binding exactly as the chart renders them."""
    kinds = {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"}
    docs = [o for o in chart if o["kind"] in kinds and "operator" in o["metadata"]["name"]]
    assert any(o["kind"] == "ClusterRole" for o in docs), "the default chart gives a ClusterRole"
    return yaml.safe_dump_all(docs)


@pytest.fixture(scope="module")
def in_cluster_credentials(own_control_plane, chart, tmp_path_factory):
    """What the kubelet mounts into the operator's pod: token, CA and namespace, for the
    chart's ServiceAccount (which the chart's RBAC binds), plus the env that points at the API."""
    cp = own_control_plane
    cp.kubectl("create", "namespace", RELEASE_NAMESPACE)
    cp.kubectl("apply", "-f", "-", input=_chart_operator_rbac(chart))
    (account,) = [o["metadata"]["name"] for o in chart.of("ServiceAccount") if "operator" in o["metadata"]["name"]]
    token = cp.kubectl("create", "token", account, "-n", RELEASE_NAMESPACE, "--duration", "1h").stdout.strip()
    folder = tmp_path_factory.mktemp("serviceaccount")
    (folder / "token").write_text(token)
    (folder / "namespace").write_text(RELEASE_NAMESPACE)
    (folder / "ca.crt").write_bytes((cp.dir / "pki" / "ca.crt").read_bytes())
    folder.chmod(0o755)
    for f in folder.iterdir():
        f.chmod(0o644)  # kubelet's projected volume: readable by the pod's user
    return {
        "flags": ["--volume", f"{folder}:/var/run/secrets/kubernetes.io/serviceaccount:ro"],
        "env": {"KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": str(cp.apiserver_port)},
    }


@pytest.fixture(scope="module")
def module_redis():
    from atlas_devstack.redis_server import RedisServer

    with RedisServer() as server:
        yield server


@pytest.fixture(scope="module")
def operator_container(images, pod_specs, in_cluster_credentials, module_redis):
    port = free_port()
    env = {
        **in_cluster_credentials["env"],
        "ATLAS_REDIS_URL": module_redis.url,
        "ATLAS_LIVENESS_HOST": "127.0.0.1",
        "ATLAS_LIVENESS_PORT": str(port),
        "ATLAS_USAGE_INTERVAL_SECONDS": "1",
    }
    container = Container.as_chart_runs(pod_specs["operator"], env, in_cluster_credentials["flags"])
    with container:
        wait_ready(container, f"http://127.0.0.1:{port}/healthz", timeout=90)  # the liveness probe
        container.liveness_url = f"http://127.0.0.1:{port}/healthz"
        yield container


@pytest.fixture(scope="module")
def mock_upstream_container(images):
    port = free_port()
    # The deploy tier's fixture image; run hardened too, as a pod of it would be.
    container = Container(
        images["mock-upstream"],
        ["--read-only", "--user", "10001:10001", "--cap-drop", "ALL", "--security-opt", "no-new-privileges"],
        {"MOCK_HOST": "127.0.0.1", "MOCK_PORT": str(port)},
    )
    with container:
        wait_ready(container, f"http://127.0.0.1:{port}/healthz")
        container.url = f"http://127.0.0.1:{port}"
        yield container


@pytest.fixture(scope="module")
def gateway_container(images, pod_specs, module_redis, mock_upstream_container):
    port = free_port()
    env = {
        "ATLAS_REDIS_URL": module_redis.url,
        "ATLAS_HOST": "127.0.0.1",
        "ATLAS_PORT": str(port),
        "ATLAS_UPSTREAM_URL": mock_upstream_container.url,
    }
    with Container.as_chart_runs(pod_specs["gateway"], env) as container:
        wait_ready(container, f"http://127.0.0.1:{port}/readyz")
        container.url = f"http://127.0.0.1:{port}"
        yield container


def test_operator_reconciles_in_cluster_and_the_gateway_serves_its_key(
    own_control_plane, operator_container, gateway_container, mock_upstream_container
):
    cp = own_control_plane
    cp.kubectl("create", "namespace", "team-a")
    cp.kubectl(
        "apply",
        "-f",
        "-",
        input=yaml.safe_dump(
            {
                "apiVersion": "atlas.bugvanquisher.io/v1alpha1",
                "kind": "AtlasKey",
                "metadata": {"name": "search", "namespace": "team-a"},
                "spec": {"limits": {"tokensPerDay": 100000, "requestsPerSecond": 50}},
            }
        ),
    )

    def key_ready() -> dict | None:
        obj = json.loads(cp.kubectl("get", "atlaskey", "search", "-n", "team-a", "-o", "json").stdout)
        ready = [c for c in obj.get("status", {}).get("conditions", []) if c["type"] == "Ready"]
        return obj if ready and ready[0]["status"] == "True" else None

    key = wait_for("AtlasKey team-a/search Ready", key_ready, 60, interval=0.1, retry=(Exception,))
    assert len(key["status"]["keyId"]) == 8

    # The operator generated the Secret (it runs as the chart's ServiceAccount: RBAC allows it).
    secret = json.loads(cp.kubectl("get", "secret", "search-api-key", "-n", "team-a", "-o", "json").stdout)
    api_key = base64.b64decode(secret["data"]["api-key"]).decode()
    assert api_key.startswith("sk-atlas-")

    client = openai.OpenAI(base_url=gateway_container.url + "/v1", api_key=api_key, max_retries=0, timeout=10)
    reply = client.chat.completions.create(
        model="llama-3.1-8b-instruct", max_tokens=8, messages=[{"role": "user", "content": "hello from a container"}]
    )
    assert reply.usage is not None and reply.usage.completion_tokens > 0
    spent = reply.usage.total_tokens

    # Usage flows back from Redis to .status (the operator's write-back, every second here).
    def usage_shown() -> bool:
        obj = json.loads(cp.kubectl("get", "atlaskey", "search", "-n", "team-a", "-o", "json").stdout)
        return obj.get("status", {}).get("usage", {}).get("tokensToday") == spent

    wait_for("tokensToday in the AtlasKey's status", usage_shown, 30, interval=0.1, retry=(Exception,))

    assert _ok(operator_container.liveness_url)
    for container in (operator_container, gateway_container, mock_upstream_container):
        assert_healthy(container)


def test_the_operator_survives_a_restart_of_its_container(operator_container):
    """A pod's container restart: same read-only root, fresh process; it must start again
    (no state written outside /tmp, no passwd lookup on the way)."""
    docker("restart", "--time", "10", operator_container.name)
    wait_ready(operator_container, operator_container.liveness_url, timeout=90)
    logs = operator_container.logs()
    assert "getpwuid" not in logs and "Traceback" not in logs, logs[-4000:]
