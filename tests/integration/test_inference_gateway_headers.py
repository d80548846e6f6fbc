"""Behind Atlas, an inference gateway: no client steers it, Atlas does (upstream/headers.py).

A real gateway process and redis-server, the strict upstream recording the headers of the last
request on every path it serves: a Sheddable key limited to ``allowed-*`` models sends every
steering, hop and identity header on every route Atlas forwards; none reaches the upstream, and
Atlas's own objective and fairness id do."""

from __future__ import annotations

import json
import urllib.request

import httpx
import openai
import pytest

from atlas_core import contract
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

    gw = GatewayProcess(redis_server.url, strict_upstream.url, tmp_path_factory.mktemp("steering"),
                        ATLAS_LOG_LEVEL="warning", ATLAS_INFERENCE_OBJECTIVES=json.dumps(OBJECTIVES),
                        ATLAS_STAMP_FAIRNESS_ID="true", ATLAS_STRIP_HEADERS="x-user-id, x-internal-*").start()
    yield gw
    gw.stop()


def received(upstream) -> dict[str, dict[str, str]]:
    """path -> the headers of the last request the upstream got on it."""
    with urllib.request.urlopen(upstream.url + "/_strict/headers", timeout=5) as resp:
        return json.loads(resp.read())


def test_no_client_header_steers_the_endpoint_picker_on_any_route(gateway, strict_upstream, redis_server):
    write_key(redis_server.url, "sk-batch-steer", "batch", contract.Limits(tokens_per_day=1_000_000),
              namespace="search", quota="team-search", quota_limits=contract.Limits(),
              models=("allowed-*",), priority="Sheddable")
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
        gateway, strict_upstream, redis_server):
    write_key(redis_server.url, "sk-critical-steer", "frontend", contract.Limits(), namespace="search",
              priority="Critical")
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="sk-critical-steer", max_retries=0)
    client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                   extra_headers=STEERING)
    headers = received(strict_upstream)["/v1/chat/completions"]
    assert [headers[name] for name in OBJECTIVE_HEADERS] == ["chat-critical"] * 2
    assert [headers[name] for name in FAIRNESS_HEADERS] == ["search/frontend"] * 2
    # the request lowers its class (never raises it): the objective follows, streamed too
    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                            stream=True, extra_headers={**STEERING, "x-atlas-priority": "Sheddable"})
    assert [chunk for chunk in stream]
    headers = received(strict_upstream)["/v1/chat/completions"]
    assert [headers[name] for name in OBJECTIVE_HEADERS] == ["batch"] * 2
    assert steered(headers) == {} and "x-atlas-priority" not in headers
