"""Routes, stored-response ownership, refusals that never reach the upstream, and Shrink, through
a real gateway process, a real redis-server and the strict upstream."""

from __future__ import annotations

import json
import urllib.request

import httpx
import pytest

from atlas_core import contract
from tests.fixtures.gateway import write_key

MODEL = "strict-model"


@pytest.fixture(scope="module")
def gateway(redis_server, strict_upstream, tmp_path_factory):
    """One gateway for the module (every test uses keys of its own)."""
    from tests.fixtures.gateway import GatewayProcess

    gw = GatewayProcess(
        redis_server.url, strict_upstream.url, tmp_path_factory.mktemp("routes"), ATLAS_LOG_LEVEL="warning"
    ).start()
    yield gw
    gw.stop()


@pytest.fixture
def redis_url(redis_server) -> str:
    return redis_server.url  # not flushed: the module's gateway caches config


def upstream_get(upstream, path: str) -> dict:
    with urllib.request.urlopen(upstream.url + path, timeout=5) as resp:
        return json.loads(resp.read())


def routes_seen(upstream) -> dict:
    return upstream_get(upstream, "/_strict/routes")


def post(gw, path: str, key: str, body: dict, **headers) -> httpx.Response:
    return httpx.post(gw.url + path, json=body, headers={"Authorization": f"Bearer {key}", **headers}, timeout=20)


def settled(redis_url: str, subject: str) -> int:
    from datetime import datetime, timezone

    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        day, _ = contract.usage_keys(subject, datetime.now(timezone.utc))
        return int(client.hget(day, "settled") or 0)
    finally:
        client.close()


def test_shrink_forwards_the_lowered_cap_and_reports_it(gateway, strict_upstream, redis_url):
    write_key(
        redis_url,
        "sk-shrink",
        "shrink",
        contract.Limits(tokens_per_day=1000),
        shortfall=contract.Shortfall("Shrink", 16),
    )
    body = {"model": MODEL, "messages": [{"role": "user", "content": "write a lot"}], "max_tokens": 800}
    ledger = {"x-strict-ledger": "shrink"}
    first = post(gateway, "/v1/chat/completions", "sk-shrink", body, **ledger)
    assert first.status_code == 200 and first.headers["x-atlas-max-tokens"] == "800"
    second = post(gateway, "/v1/chat/completions", "sk-shrink", body, **ledger)
    assert second.status_code == 200
    cap = int(second.headers["x-atlas-max-tokens"])
    assert 16 <= cap < 800
    assert second.json()["usage"]["completion_tokens"] == cap  # the upstream was held to it
    refused = post(gateway, "/v1/chat/completions", "sk-shrink", body, **ledger)
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "insufficient_quota"
    counted = upstream_get(strict_upstream, "/_strict/ledger/shrink")
    assert counted["requests"] == 2 and counted["tokens"] <= 1000
    assert settled(redis_url, contract.key_subject("team", "shrink")) == counted["tokens"]


def test_reject_is_the_default_policy(gateway, redis_url):
    write_key(redis_url, "sk-reject", "reject", contract.Limits(tokens_per_day=1000))
    body = {"model": MODEL, "messages": [{"role": "user", "content": "write a lot"}], "max_tokens": 800}
    assert post(gateway, "/v1/chat/completions", "sk-reject", body).status_code == 200
    assert post(gateway, "/v1/chat/completions", "sk-reject", body).status_code == 429


def test_stored_responses_answer_only_their_creator(gateway, strict_upstream, redis_url):
    write_key(redis_url, "sk-owner", "owner", contract.Limits(tokens_per_day=1_000_000))
    write_key(redis_url, "sk-other", "other", contract.Limits(tokens_per_day=1_000_000))
    created = post(gateway, "/v1/responses", "sk-owner", {"model": MODEL, "input": "hello", "max_output_tokens": 5})
    assert created.status_code == 200, created.text
    assert created.headers["x-atlas-max-tokens"] == "5"
    rid = created.json()["id"]
    streamed = post(
        gateway, "/v1/responses", "sk-owner", {"model": MODEL, "input": "again", "max_output_tokens": 5, "stream": True}
    )
    assert b"response.completed" in streamed.content
    streamed_id = next(
        json.loads(line[5:])["response"]["id"]
        for line in streamed.text.splitlines()
        if line.startswith("data:") and "response.created" in line
    )
    before = routes_seen(strict_upstream)

    for response_id in (rid, streamed_id):
        for method in ("GET", "DELETE"):
            other = httpx.request(
                method, f"{gateway.url}/v1/responses/{response_id}", headers={"Authorization": "Bearer sk-other"}
            )
            assert other.status_code == 404 and other.json()["error"]["code"] == "not_found"
    continued = post(
        gateway, "/v1/responses", "sk-other", {"model": MODEL, "input": "more", "previous_response_id": rid}
    )
    assert continued.status_code == 404 and continued.json()["error"]["param"] == "response_id"
    assert routes_seen(strict_upstream) == before  # the upstream was never asked

    mine = httpx.get(f"{gateway.url}/v1/responses/{streamed_id}", headers={"Authorization": "Bearer sk-owner"})
    assert mine.status_code == 200 and mine.json()["id"] == streamed_id
    # a continuation re-feeds the stored conversation: the reservation includes it
    continued = post(
        gateway,
        "/v1/responses",
        "sk-owner",
        {"model": MODEL, "input": "more", "previous_response_id": rid, "max_output_tokens": 5},
    )
    assert continued.status_code == 200, continued.text
    assert continued.json()["usage"]["input_tokens"] > created.json()["usage"]["total_tokens"]
    deleted = httpx.delete(f"{gateway.url}/v1/responses/{rid}", headers={"Authorization": "Bearer sk-owner"})
    assert deleted.status_code == 200
    assert (
        httpx.get(f"{gateway.url}/v1/responses/{rid}", headers={"Authorization": "Bearer sk-owner"}).status_code == 404
    )


@pytest.mark.parametrize(
    "path",
    [
        "/v1/audio/transcriptions",
        "/pooling",
        "/v1/chat/completions/extra",
        "/invocations",
        "/v2/rerank",
        "/v1/classify",
        "/",
    ],
)
def test_every_other_path_is_an_openai_404_that_never_reaches_the_upstream(gateway, strict_upstream, redis_url, path):
    write_key(redis_url, "sk-paths", "paths")
    before = routes_seen(strict_upstream)
    reply = post(gateway, path, "sk-paths", {"model": MODEL})
    assert reply.status_code == 404
    assert reply.json()["error"]["type"] == "invalid_request_error" and reply.headers["x-request-id"]
    assert routes_seen(strict_upstream) == before


@pytest.mark.parametrize(
    "path, body, param",
    [
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": [{"type": "file", "file": {}}]}]},
            "messages[0].content[0].type",
        ),
        ("/v1/completions", {"prompt": [{"text": "x"}]}, "prompt[0]"),
        ("/v1/embeddings", {"input": []}, "input"),
        ("/v1/responses", {"input": "x", "background": True}, "background"),
        ("/v1/responses", {"input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0].type"),
        (
            "/v1/messages",
            {"messages": [{"role": "user", "content": [{"type": "document", "source": {}}]}]},
            "messages[0].content[0].type",
        ),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "x"}], "chat_template": "{{x}}"},
            "chat_template",
        ),
    ],
)
def test_what_cannot_be_bounded_is_refused_naming_the_field(gateway, strict_upstream, redis_url, path, body, param):
    write_key(redis_url, "sk-bad", "bad", contract.Limits(tokens_per_day=1_000_000))
    before = routes_seen(strict_upstream)
    reply = post(gateway, path, "sk-bad", {"model": MODEL, **body})
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["param"] == param
    assert routes_seen(strict_upstream) == before
    assert settled(redis_url, contract.key_subject("team", "bad")) == 0


def test_tokenize_and_detokenize_count_requests_not_tokens(gateway, strict_upstream, redis_url):
    write_key(redis_url, "sk-tok", "tok", contract.Limits(requests_per_second=0.001, burst=2, tokens_per_day=10))
    first = post(gateway, "/tokenize", "sk-tok", {"model": MODEL, "prompt": "x" * 5000})
    assert first.status_code == 200 and first.json()["count"] > 10  # larger than the token budget: no matter
    assert post(gateway, "/detokenize", "sk-tok", {"model": MODEL, "tokens": [1, 2, 3]}).status_code == 200
    limited = post(gateway, "/tokenize", "sk-tok", {"model": MODEL, "prompt": "x"})
    assert limited.status_code == 429 and limited.json()["error"]["type"] == "requests"
    assert settled(redis_url, contract.key_subject("team", "tok")) == 0


def test_messages_stream_bills_the_last_running_count(gateway, strict_upstream, redis_url):
    write_key(redis_url, "sk-msg", "msg", contract.Limits(tokens_per_day=1_000_000))
    body = {"model": MODEL, "max_tokens": 30, "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    reply = post(gateway, "/v1/messages", "sk-msg", body, **{"x-strict-ledger": "msg", "x-api-key": "sk-msg"})
    assert reply.status_code == 200 and b"message_stop" in reply.content
    counted = upstream_get(strict_upstream, "/_strict/ledger/msg")
    assert counted["completion"] == 30
    assert settled(redis_url, contract.key_subject("team", "msg")) == counted["tokens"]


def test_openai_sdk_responses_and_shrink_header(gateway, redis_url):
    import openai

    write_key(
        redis_url, "sk-sdk-a", "sdk-a", contract.Limits(tokens_per_day=5000), shortfall=contract.Shortfall("Shrink", 16)
    )
    write_key(redis_url, "sk-sdk-b", "sdk-b", contract.Limits(tokens_per_day=5000))
    a = openai.OpenAI(base_url=gateway.url + "/v1", api_key="sk-sdk-a", max_retries=0, timeout=15)
    b = openai.OpenAI(base_url=gateway.url + "/v1", api_key="sk-sdk-b", max_retries=0, timeout=15)
    response = a.responses.create(model=MODEL, input="hello", max_output_tokens=10)
    assert response.usage.output_tokens == 10
    assert a.responses.retrieve(response.id).id == response.id
    with pytest.raises(openai.NotFoundError):
        b.responses.retrieve(response.id)
    with pytest.raises(openai.NotFoundError):
        b.responses.delete(response.id)
    # Shrink, seen by the SDK: asking for more than is left gets what is left
    raw = a.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": "long"}], max_tokens=100_000
    )
    cap = int(raw.headers["x-atlas-max-tokens"])
    assert 16 <= cap < 5000 and raw.parse().usage.completion_tokens == cap


@pytest.mark.parametrize(
    "method, suffix",
    [
        ("GET", "/%2e%2e/%2e%2e/models"),
        ("GET", "/input_items/%2e%2e/%2e%2e/%2e%2e/models"),
        ("GET", "/anything"),
        ("POST", ""),
        ("DELETE", "/cancel"),
    ],
)
def test_stored_response_paths_cannot_reach_other_upstream_routes(gateway, strict_upstream, redis_url, method, suffix):
    write_key(redis_url, "sk-walker", "walker", contract.Limits(tokens_per_day=1_000_000))
    rid = post(gateway, "/v1/responses", "sk-walker", {"model": MODEL, "input": "x", "max_output_tokens": 1}).json()[
        "id"
    ]
    before = routes_seen(strict_upstream)
    reply = httpx.request(
        method, f"{gateway.url}/v1/responses/{rid}{suffix}", headers={"Authorization": "Bearer sk-walker"}
    )
    assert reply.status_code in (404, 405) and "error" in reply.json()
    assert routes_seen(strict_upstream) == before
