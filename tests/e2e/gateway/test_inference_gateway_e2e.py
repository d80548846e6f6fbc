"""Behind Atlas, an inference gateway, end to end: the official openai SDK, a real gateway process
and Redis, the mock upstream recording what it receives (as an endpoint picker would see it).
No client steers it; Atlas stamps the objective of the request's effective priority, which a soft
budget lowers to Sheddable (and shedding follows)."""

from __future__ import annotations

import json
import uuid

import httpx
import openai
import pytest

from atlas_core import contract
from atlas_devstack.waiting import wait_for
from atlas_gateway.upstream.headers import FAIRNESS_HEADERS, OBJECTIVE_HEADERS
from tests.fixtures.gateway import GatewayProcess, write_key
from tests.fixtures.steering import STEERING, steered

MODEL = "llama-3.1-8b-instruct"
MESSAGES = [{"role": "user", "content": "Hello there"}]
OBJECTIVES = {"Critical": "chat-critical", "Standard": "chat", "Sheddable": "batch"}


@pytest.fixture(scope="module")
def gateway(redis_server, mock_upstream, tmp_path_factory):  # noqa: F811
    gw = GatewayProcess(
        redis_server.url,
        mock_upstream.url,
        tmp_path_factory.mktemp("igw"),
        ATLAS_INFERENCE_OBJECTIVES=json.dumps(OBJECTIVES),
        ATLAS_STAMP_FAIRNESS_ID="true",
        ATLAS_SHED_SCOPE="process",
        ATLAS_SHED_THRESHOLD="2",
        ATLAS_SHED_THRESHOLD_STANDARD="50",
        ATLAS_SHED_THRESHOLD_CRITICAL="100",
    ).start()
    yield gw
    gw.stop()


def new_key(redis_url: str, limits: contract.Limits, **fields) -> tuple[str, str]:
    name = "k-" + uuid.uuid4().hex[:10]
    api_key = "sk-atlas-" + uuid.uuid4().hex
    write_key(redis_url, api_key, name, limits, **fields)
    return api_key, name


def received(mock_upstream, mock_id: str) -> dict[str, str]:
    return httpx.get(f"{mock_upstream.url}/_mock/requests/{mock_id}").json()["headers"]


def usage(gateway, api_key: str) -> dict:
    return httpx.get(gateway.url + "/v1/usage", headers={"x-api-key": api_key}).json()


def test_soft_budget_demotes_the_objective_stamped_and_says_so(gateway, mock_upstream, redis_url):
    # Critical until 40 tokens settled today (the mock answers prompt 5 + completion 16 = 21 tokens)
    api_key, name = new_key(
        redis_url, contract.Limits(tokens_per_day=10_000, soft_tokens_per_day=40), priority="Critical"
    )
    sdk = openai.OpenAI(base_url=gateway.url + "/v1", api_key=api_key, max_retries=0, timeout=15)

    def ask(mock_id: str):
        return sdk.chat.completions.with_raw_response.create(
            model=MODEL,
            messages=MESSAGES,
            max_tokens=16,
            extra_headers={**STEERING, "x-mock-id": mock_id, "x-mock-prompt-tokens": "5"},
        )

    for n, settled in ((1, 21), (2, 42)):  # below 40 settled: Critical
        answer = ask(f"{name}-{n}")
        assert "x-atlas-demoted" not in answer.headers
        headers = received(mock_upstream, f"{name}-{n}")
        assert steered(headers) == {}
        assert [headers[h] for h in OBJECTIVE_HEADERS] == ["chat-critical"] * 2
        assert [headers[h] for h in FAIRNESS_HEADERS] == [f"team/{name}"] * 2
        wait_for("the settlement", lambda: usage(gateway, api_key)["usage"]["tokensToday"] == settled, 5)  # noqa: B023 (run in this iteration)
    demoted = ask(f"{name}-3")  # 42 settled: the soft budget is reached
    assert demoted.headers["x-atlas-demoted"] == f'softTokensPerDay; owner="AtlasKey team/{name}"'
    assert demoted.parse().choices[0].message.content  # admitted all the same
    headers = received(mock_upstream, f"{name}-3")
    assert [headers[h] for h in OBJECTIVE_HEADERS] == ["batch"] * 2 and steered(headers) == {}
    shown = usage(gateway, api_key)
    assert shown["demoted"] == "softTokensPerDay" and shown["remainingBeforeDemotion"]["tokensToday"] == 0
    assert shown["limits"]["softTokensPerDay"] == 40
    metrics = httpx.get(gateway.url + "/metrics").text
    assert f'atlas_gateway_demoted_total{{budget="softTokensPerDay",key="team/{name}",kind="AtlasKey"}} 1.0' in metrics
    assert f'key="team/{name}",model="{MODEL}",priority="Sheddable",status="200"' in metrics
    assert api_key not in metrics


def test_a_demoted_request_is_shed_with_the_sheddable_ones(gateway, redis_url):
    busy, _ = new_key(redis_url, contract.Limits(), priority="Critical")
    api_key, name = new_key(
        redis_url,
        contract.Limits(),
        priority="Critical",
        quota="team-batch",
        quota_limits=contract.Limits(soft_tokens_per_month=1),
    )
    url = gateway.url + "/v1/chat/completions"
    ask = {"model": MODEL, "messages": MESSAGES, "max_tokens": 4}
    first = httpx.post(url, json=ask, headers={"Authorization": f"Bearer {api_key}"})
    assert first.status_code == 200 and "x-atlas-demoted" not in first.headers
    wait_for("the settlement", lambda: usage(gateway, api_key)["quota"]["demoted"] == "softTokensPerMonth", 5)
    owner = 'softTokensPerMonth; owner="AtlasQuota team/team-batch"'
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 100, "stream": True}
    slow = {"Authorization": f"Bearer {busy}", "x-mock-chunk-delay-ms": "50"}
    with httpx.Client(timeout=10) as client:
        with (
            client.stream("POST", url, json=body, headers=slow) as one,
            client.stream("POST", url, json=body, headers=slow) as two,
        ):
            assert one.status_code == two.status_code == 200  # 2 in flight: Sheddable is shed
            shed = httpx.post(url, json=ask, headers={"Authorization": f"Bearer {api_key}"})
            assert shed.status_code == 503 and shed.json()["error"]["code"] == "overloaded"
            assert shed.headers["x-atlas-demoted"] == owner and int(shed.headers["retry-after"]) >= 1
            kept = httpx.post(url, json=ask, headers={"Authorization": f"Bearer {busy}"})
            assert kept.status_code == 200  # Critical, not demoted: served
    assert usage(gateway, api_key)["usage"]["requestsToday"] == 1  # the shed request consumed nothing
    admitted = httpx.post(url, json=ask, headers={"Authorization": f"Bearer {api_key}"})
    assert admitted.status_code == 200 and admitted.headers["x-atlas-demoted"] == owner  # once the load is gone
