"""The deploy tier: Atlas's images as pods on a real node (kubelet + containerd + CNI, built from
source), installed by `helm upgrade --install --wait` with the chart's defaults, driven through
the gateway's Service by the openai SDK.

One node per machine (fixed bridge and addresses), so the session brings up its own stack in
.deploy-test/ and removes it at the end; it refuses to run while `make deploy-up`'s stack is
up. ATLAS_DEPLOY_REUSE=<state dir> runs the tests against an already running stack instead
(kept afterwards): quick iterations on a test.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import ssl
import subprocess
import threading
import time
import urllib.request
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import yaml

from atlas_core import contract
from atlas_devstack.deploy import DeployStack
from atlas_devstack.node_network import BRIDGE
from atlas_devstack.tools import REPO_ROOT
from atlas_devstack.waiting import wait_for

MODEL = "llama-3.1-8b-instruct"
# What a client without retries may see while a gateway pod goes away: a connection refused by
# an endpoint kube-proxy has not removed yet, or closed before any response. Never a 5xx or a
# timeout; the openai SDK's default retries absorb both.
CONNECTION_ERRORS = {"connect-refused", "connect-timeout", "connection-lost"}
# A pod's endpoint leaves kube-proxy's rules a moment after the pod stops serving.
PROPAGATION_SLACK_SECONDS = 5.0
KEY_NAMESPACE = "default"
TEST_STATE_DIR = REPO_ROOT / ".deploy-test"


def wait_until(what: str, check: Callable[[], object], timeout: float = 60, interval: float = 0.2):
    """The one wait helper (atlas_devstack.waiting) with this tier's habits: 60 s, and a check
    that fails (a pod being replaced, a Service not routing yet) means "not yet"."""
    return wait_for(what, check, timeout, interval=interval, retry=(Exception,))


class Cluster:
    """The running deploy stack, seen as a user sees it: kubectl, helm, the gateway Service."""

    def __init__(self, stack: DeployStack, env: dict[str, str]):
        self.stack = stack
        self.env = env
        self.namespace = env["ATLAS_NAMESPACE"]
        self.gateway_url = env["ATLAS_GATEWAY_URL"]

    def kubectl(self, *args: str, input: str | None = None, check: bool = True, timeout: float = 120):
        return self.stack.kubectl(*args, input=input, check=check, timeout=timeout)

    def helm(self, *args: str, check: bool = True, timeout: float = 600):
        return self.stack.helm(*args, check=check, timeout=timeout)

    def json(self, *args: str) -> dict:
        return json.loads(self.kubectl(*args, "-o", "json").stdout)

    def pods(self, component: str | None = None, namespace: str | None = None) -> list[dict]:
        args = ["get", "pods", "-n", namespace or self.namespace]
        if component:
            args += ["-l", f"app.kubernetes.io/component={component}"]
        return self.json(*args)["items"]

    def running_pods(self, component: str) -> list[dict]:
        return [
            p
            for p in self.pods(component)
            if p["status"].get("phase") == "Running" and not p["metadata"].get("deletionTimestamp")
        ]

    def ready(self, pod: dict) -> bool:
        return any(c["type"] == "Ready" and c["status"] == "True" for c in pod["status"].get("conditions", []))

    def wait_ready(self, component: str, count: int, timeout: float = 180) -> list[dict]:
        def check():
            pods = [p for p in self.running_pods(component) if self.ready(p)]
            return pods if len(pods) == count and len(self.pods(component)) == count else None

        return wait_until(f"{count} Ready {component} pod(s) and no other", check, timeout)

    def apply_key(self, name: str, spec: dict, namespace: str = KEY_NAMESPACE) -> str:
        """Apply an AtlasKey, wait until Ready, return its generated API key."""
        doc = {
            "apiVersion": "atlas.bugvanquisher.io/v1alpha1",
            "kind": "AtlasKey",
            "metadata": {"name": name, "namespace": namespace},
            "spec": spec,
        }
        self.kubectl("apply", "-f", "-", input=yaml.safe_dump(doc))
        self.kubectl("wait", "-n", namespace, "--for=condition=Ready", f"atlaskey/{name}", "--timeout=90s", timeout=100)
        secret = self.json("get", "secret", "-n", namespace, f"{name}-api-key")
        return base64.b64decode(secret["data"]["api-key"]).decode()

    def redis_cli(self, *args: str) -> str:
        pod = self.pods("redis")[0]["metadata"]["name"]
        return self.kubectl("exec", "-n", self.namespace, pod, "-c", "redis", "--", "redis-cli", *args).stdout

    def live_leases(self, key_name: str, namespace: str = KEY_NAMESPACE) -> tuple[int, int]:
        """(leases whose expiry is in the future, all lease entries) of an AtlasKey."""
        zset = contract.lease_key(contract.key_subject(namespace, key_name))
        now_ms = int(time.time() * 1000)
        live = int(self.redis_cli("ZCOUNT", zset, str(now_ms), "+inf").strip() or 0)
        total = int(self.redis_cli("ZCARD", zset).strip() or 0)
        return live, total

    def usage(self, api_key: str) -> dict:
        req = urllib.request.Request(self.gateway_url + "/v1/usage", headers={"authorization": f"Bearer {api_key}"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read())

    def requests_by_pod(self) -> dict[str, float]:
        """atlas_gateway_requests_total summed per gateway pod (scraped at the pod IP)."""
        out = {}
        for pod in self.running_pods("gateway"):
            ip = pod["status"]["podIP"]
            with urllib.request.urlopen(f"http://{ip}:8080/metrics", timeout=10) as resp:
                text = resp.read().decode()
            out[pod["metadata"]["name"]] = sum(
                float(line.rsplit(" ", 1)[1])
                for line in text.splitlines()
                if line.startswith("atlas_gateway_requests_total{")
            )
        return out

    def wait_gateways_settled(self, api_key: str, streak: int = 30, timeout: float = 90) -> None:
        """Until `streak` requests in a row, each on a new connection, succeed: no endpoint of an
        earlier rollout or kill is left in kube-proxy's rules."""
        import httpx
        import openai

        client = openai.OpenAI(
            base_url=self.gateway_url + "/v1",
            api_key=api_key,
            max_retries=0,
            timeout=5,
            http_client=httpx.Client(limits=httpx.Limits(max_keepalive_connections=0)),
        )

        def all_ok() -> bool:
            for _ in range(streak):
                try:
                    client.chat.completions.create(
                        model=MODEL, max_tokens=1, messages=[{"role": "user", "content": "x"}]
                    )
                except openai.OpenAIError:
                    return False
            return True

        with client:
            wait_until(f"{streak} requests in a row answered", all_ok, timeout)

    def apiserver_ssl(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.stack.cp_dir / "pki" / "ca.crt"))

    def apiserver_url(self) -> str:
        return (self.stack.cp_dir / "server").read_text().strip()


# ------------------------------------------------------------------ load


@dataclass
class LoadResult:
    outcomes: Counter = field(default_factory=Counter)  # "200", "429:insufficient_quota", "conn", ...
    error_times: list = field(default_factory=list)  # (time.monotonic() it was sent, kind) per error
    tokens: int = 0
    started: float = 0.0
    stopped: float = 0.0

    @property
    def ok(self) -> int:
        return self.outcomes["200"]

    @property
    def errors(self) -> dict[str, int]:
        return {k: v for k, v in self.outcomes.items() if k != "200"}

    def total(self) -> int:
        return sum(self.outcomes.values())

    def errors_outside(self, start: float, end: float) -> list:
        """Errors of requests sent outside [start, end] (time.monotonic())."""
        return [(round(t - start, 1), kind) for t, kind in self.error_times if not start <= t <= end]


def _classify(exc: Exception) -> str:
    import openai

    if isinstance(exc, openai.APIStatusError):
        code = ""
        try:
            code = exc.body.get("code") or exc.body.get("type") or ""
        except AttributeError:
            pass
        return f"{exc.status_code}:{code}"
    if isinstance(exc, openai.APITimeoutError):
        import httpx

        # A SYN to an endpoint already gone (no answer) vs a request left unanswered.
        return "connect-timeout" if isinstance(exc.__cause__, httpx.ConnectTimeout) else "timeout"
    if isinstance(exc, openai.APIConnectionError):
        import httpx

        # Refused before reaching a gateway (an endpoint on its way out) vs cut mid-request.
        return "connect-refused" if isinstance(exc.__cause__, httpx.ConnectError) else "connection-lost"
    return type(exc).__name__


async def one_request(client, result: LoadResult, max_tokens: int = 16) -> None:
    started = time.monotonic()
    try:
        reply = await client.chat.completions.create(
            model=MODEL, max_tokens=max_tokens, messages=[{"role": "user", "content": "ping"}]
        )
        result.outcomes["200"] += 1
        result.tokens += reply.usage.total_tokens
    except Exception as exc:  # noqa: BLE001 - every outcome is counted
        kind = _classify(exc)
        result.outcomes[kind] += 1
        result.error_times.append((started, kind))


def openai_client(cluster: Cluster, api_key: str, timeout: float = 20.0, max_retries: int = 0):
    """max_retries=0 shows every error; the SDK's default (2) is what applications get."""
    import httpx
    import openai

    return openai.AsyncOpenAI(
        base_url=cluster.gateway_url + "/v1",
        api_key=api_key,
        max_retries=max_retries,
        timeout=timeout,
        # Short-lived connections: each request picks a Service endpoint (kube-proxy balances
        # connections, not requests), as many independent clients would.
        http_client=httpx.AsyncClient(limits=httpx.Limits(max_keepalive_connections=0)),
    )


def burst(cluster: Cluster, api_key: str, n: int) -> LoadResult:
    """n requests at once."""
    result = LoadResult(started=time.monotonic())

    async def main():
        client = openai_client(cluster, api_key)
        async with client:
            await asyncio.gather(*(one_request(client, result) for _ in range(n)))

    asyncio.run(main())
    result.stopped = time.monotonic()
    return result


class Load:
    """Steady traffic from a background thread: `concurrency` clients in a loop until stop()."""

    def __init__(self, cluster: Cluster, api_key: str, concurrency: int = 8, max_retries: int = 0):
        self.cluster, self.api_key, self.concurrency = cluster, api_key, concurrency
        self.max_retries = max_retries
        self.result = LoadResult()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    async def _main(self):
        client = openai_client(self.cluster, self.api_key, max_retries=self.max_retries)

        async def worker():
            while not self._stop.is_set():
                await one_request(client, self.result)

        async with client:
            await asyncio.gather(*(worker() for _ in range(self.concurrency)))

    def __enter__(self) -> "Load":
        self.result.started = time.monotonic()
        self._thread.start()
        return self

    def wait_for_requests(self, n: int, timeout: float = 60) -> None:
        wait_until(f"{n} requests answered", lambda: self.result.total() >= n, timeout)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(60)
        self.result.stopped = time.monotonic()


# ------------------------------------------------------------------ session fixture


def _bridge_exists() -> bool:
    return subprocess.run(["ip", "link", "show", BRIDGE], capture_output=True).returncode == 0


@pytest.fixture(scope="session")
def cluster(request) -> Cluster:
    if os.geteuid() != 0:
        message = "the deploy tier runs a kubelet and containerd: it needs root"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    reuse = os.environ.get("ATLAS_DEPLOY_REUSE")
    if reuse:
        stack = DeployStack(reuse)
        env = stack.write_env()
        yield Cluster(stack, env)
        return
    if _bridge_exists():
        pytest.fail(
            f"another deploy node is running (bridge {BRIDGE} exists): `make deploy-down` first, "
            "or ATLAS_DEPLOY_REUSE=.deploy to test that one"
        )
    request.getfixturevalue("docker_engine")  # the images are built with it; stopped at the end
    stack = DeployStack(TEST_STATE_DIR)
    try:
        env = stack.up()
        yield Cluster(stack, env)
    finally:
        stack.down()


@pytest.fixture
def key_name() -> str:
    return f"t-{uuid.uuid4().hex[:8]}"


def pytest_collection_modifyitems(items):
    """The first test also pays for the session's `deploy-up` (image builds on a cold cache)."""
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.timeout(1800))
