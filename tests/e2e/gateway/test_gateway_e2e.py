"""The gateway end to end, driven by the official openai SDK (and httpx where the SDK would
hide what is being tested)."""

from __future__ import annotations

import json
import uuid
from datetime import datetime, timezone

import httpx
import openai
import pytest
import redis

from atlas_core import contract
from atlas_devstack.waiting import wait_for
from atlas_gateway.metering.bounds import Meter
from atlas_gateway.routes import route
from atlas_gateway.settings import Settings

MODEL = "llama-3.1-8b-instruct"
MESSAGES = [{"role": "user", "content": "Hello there"}]


def mock_record(mock_upstream, mock_id: str) -> dict:
    return httpx.get(f"{mock_upstream.url}/_mock/requests/{mock_id}").json()


def usage_of(redis_url: str, name: str, namespace: str = "team", quota: str | None = None) -> contract.Usage:
    client = redis.Redis.from_url(redis_url)
    try:
        now = datetime.now(timezone.utc)
        day, month = contract.usage_keys(
            contract.key_subject(namespace, name), now, contract.slot_tag(namespace, name, quota)
        )
        return contract.parse_usage(client.hgetall(day), client.hgetall(month), now)
    finally:
        client.close()


def leases_of(redis_url: str, name: str, namespace: str = "team") -> int:
    client = redis.Redis.from_url(redis_url)
    try:
        subject = contract.key_subject(namespace, name)
        return client.zcard(contract.lease_key(subject)) + client.hlen(contract.lease_tokens_key(subject))
    finally:
        client.close()


# ---------------------------------------------------------------------------- happy paths


def test_chat_sync_with_rate_limit_headers(sdk, new_key, redis_url):
    key, name = new_key(contract.Limits(requests_per_second=10, tokens_per_day=100_000))
    raw = sdk(key).chat.completions.with_raw_response.create(
        model=MODEL,
        messages=MESSAGES,
        max_tokens=10,
        extra_headers={"x-mock-prompt-tokens": "5", "x-mock-completion-tokens": "7"},
    )
    completion = raw.parse()
    assert completion.choices[0].message.content.startswith("tok")
    assert completion.usage.total_tokens == 12
    for kind in ("requests", "tokens"):
        for part in ("limit", "remaining", "reset"):
            assert raw.headers[f"x-ratelimit-{part}-{kind}"], (part, kind)
    assert raw.headers["x-ratelimit-limit-tokens"] == "100000"
    assert raw.headers["x-request-id"]
    wait_for("settlement", lambda: usage_of(redis_url, name).tokens_today == 12, 5)
    assert usage_of(redis_url, name).requests_today == 1
    assert leases_of(redis_url, name) == 0


def test_streaming_strips_injected_usage(sdk, new_key, mock_upstream, redis_url):
    key, name = new_key(contract.Limits(tokens_per_day=100_000))
    mock_id = uuid.uuid4().hex
    stream = sdk(key).chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        max_tokens=6,
        stream=True,
        extra_headers={"x-mock-id": mock_id, "x-mock-prompt-tokens": "4"},
    )
    chunks = list(stream)
    assert len(chunks) == 6
    assert all(c.choices for c in chunks), "the usage-only chunk reached the client"
    assert all(getattr(c, "usage", None) is None for c in chunks)
    record = mock_record(mock_upstream, mock_id)
    assert record["include_usage"] is True and record["count"] == 1
    wait_for("streamed usage settled", lambda: usage_of(redis_url, name).tokens_today == 10, 5)


def test_streaming_keeps_usage_when_client_asked(sdk, new_key, redis_url):
    key, name = new_key()
    stream = sdk(key).chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        max_tokens=3,
        stream=True,
        stream_options={"include_usage": True},
        extra_headers={"x-mock-prompt-tokens": "4"},
    )
    chunks = list(stream)
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == 7
    wait_for("settlement", lambda: usage_of(redis_url, name).tokens_today == 7, 5)


def test_completions_and_embeddings(sdk, new_key, redis_url):
    key, name = new_key(contract.Limits(tokens_per_minute=100_000))
    client = sdk(key)
    text = client.completions.create(
        model=MODEL, prompt="Once upon", max_tokens=4, extra_headers={"x-mock-prompt-tokens": "2"}
    )
    assert text.choices[0].text and text.usage.total_tokens == 6
    emb = client.embeddings.create(
        model="text-embedding-3-small", input=["a", "b"], extra_headers={"x-mock-prompt-tokens": "3"}
    )
    assert len(emb.data) == 2
    wait_for("both settled", lambda: usage_of(redis_url, name).tokens_today == 9, 5)


def test_models_filtered_by_allowed_globs(sdk, new_key):
    key, _ = new_key(models=("llama-*", "qwen2.5-*"))
    ids = {m.id for m in sdk(key).models.list()}
    assert ids == {"llama-3.1-8b-instruct", "qwen2.5-7b-instruct"}


def test_usage_endpoint(gateway, new_key, redis_url):
    key, name = new_key(
        contract.Limits(tokens_per_day=1000), quota="team-budget", quota_limits=contract.Limits(tokens_per_month=50_000)
    )
    r = httpx.post(
        gateway.url + "/v1/chat/completions",
        headers={"Authorization": f"Bearer {key}", "x-mock-prompt-tokens": "5", "x-mock-completion-tokens": "7"},
        json={"model": MODEL, "messages": MESSAGES, "max_tokens": 10},
    )
    assert r.status_code == 200
    wait_for("settlement", lambda: usage_of(redis_url, name, quota="team-budget").tokens_today == 12, 5)
    doc = httpx.get(gateway.url + "/v1/usage", headers={"x-api-key": key}).json()
    assert doc["key"]["namespace"] == "team" and doc["key"]["name"] == name and len(doc["key"]["keyId"]) == 8
    assert doc["usage"]["tokensToday"] == 12 and doc["usage"]["requestsToday"] == 1
    assert doc["limits"] == {"tokensPerDay": 1000}
    assert doc["remaining"]["tokensToday"] == 988
    assert doc["quota"]["name"] == "team-budget"
    assert doc["quota"]["usage"]["tokensThisMonth"] == 12
    assert doc["quota"]["remaining"]["tokensThisMonth"] == 49_988


# ---------------------------------------------------------------------------- refusals


def test_rate_limit_error_carries_headers(sdk, new_key, gateway):
    key, name = new_key(contract.Limits(requests_per_second=0.5, burst=1))
    client = sdk(key)
    client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2)
    with pytest.raises(openai.RateLimitError) as exc:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2)
    headers = exc.value.response.headers
    assert int(headers["retry-after"]) >= 1
    assert headers["x-ratelimit-limit-requests"] == "1"
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert headers["x-ratelimit-reset-requests"]
    assert headers["x-request-id"]
    assert exc.value.body["type"] == "requests" and exc.value.body["code"] == "rate_limit_exceeded"
    metrics = httpx.get(gateway.url + "/metrics").text
    assert f'atlas_gateway_rejections_total{{key="team/{name}",reason="requests_per_second"}} 1.0' in metrics
    assert f'key="team/{name}",reason="rate_limit_exceeded"' not in metrics  # counted once


def test_daily_budget_is_insufficient_quota(sdk, new_key):
    key, _ = new_key(contract.Limits(tokens_per_day=50))
    with pytest.raises(openai.RateLimitError) as exc:
        sdk(key).chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=100)
    assert exc.value.body["code"] == "insufficient_quota"
    assert exc.value.response.headers["x-should-retry"] == "false"
    assert int(exc.value.response.headers["retry-after"]) >= 1
    assert exc.value.response.headers["x-ratelimit-limit-tokens"] == "50"


def test_unknown_key_is_authentication_error(sdk, gateway):
    with pytest.raises(openai.AuthenticationError) as exc:
        sdk("sk-atlas-does-not-exist").chat.completions.create(model=MODEL, messages=MESSAGES)
    assert exc.value.body["code"] == "invalid_api_key"
    assert exc.value.response.headers["x-request-id"]
    missing = httpx.post(gateway.url + "/v1/chat/completions", json={"model": MODEL, "messages": MESSAGES})
    assert missing.status_code == 401


def test_disallowed_model_and_suspended_key_are_permission_errors(sdk, new_key):
    key, _ = new_key(models=("qwen2.5-*",))
    with pytest.raises(openai.PermissionDeniedError) as exc:
        sdk(key).chat.completions.create(model=MODEL, messages=MESSAGES)
    assert exc.value.body["type"] == "permission_error"
    suspended, _ = new_key(suspended=True)
    with pytest.raises(openai.PermissionDeniedError):
        sdk(suspended).chat.completions.create(model=MODEL, messages=MESSAGES)
    expired, _ = new_key(expires_at=datetime(2020, 1, 1, tzinfo=timezone.utc).timestamp())
    with pytest.raises(openai.PermissionDeniedError):
        sdk(expired).chat.completions.create(model=MODEL, messages=MESSAGES)


def test_body_too_large_and_malformed_json(gateway, new_key):
    key, _ = new_key()
    headers = {"Authorization": f"Bearer {key}", "content-type": "application/json"}
    big = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x" * 70_000}]})
    r = httpx.post(gateway.url + "/v1/chat/completions", content=big, headers=headers)
    assert r.status_code == 413 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.post(gateway.url + "/v1/chat/completions", content=b"{nope", headers=headers)
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.post(gateway.url + "/v1/chat/completions", json={"model": MODEL}, headers=headers)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"


# ---------------------------------------------------------------------------- failures


def test_upstream_drop_mid_stream(sdk, new_key, mock_upstream, redis_url):
    key, name = new_key(contract.Limits(max_concurrent=2, tokens_per_day=100_000))
    mock_id = uuid.uuid4().hex
    stream = sdk(key).chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        max_tokens=10,
        stream=True,
        extra_headers={"x-mock-fail": "drop-mid-stream", "x-mock-id": mock_id},
    )
    received = []
    with pytest.raises(openai.APIError) as exc:
        for chunk in stream:
            received.append(chunk)
    assert len(received) == 5
    assert "mid-stream" in str(exc.value)
    wait_for("lease released", lambda: leases_of(redis_url, name) == 0, 5)
    usage = usage_of(redis_url, name)
    assert usage.tokens_today >= 5  # prompt estimate + the 5 delivered chunks
    assert mock_record(mock_upstream, mock_id)["count"] == 1  # never sent twice


def test_client_disconnect_aborts_upstream(gateway, new_key, mock_upstream, redis_url):
    key, name = new_key(contract.Limits(max_concurrent=1, tokens_per_day=100_000))
    mock_id = uuid.uuid4().hex
    headers = {"Authorization": f"Bearer {key}", "x-mock-id": mock_id, "x-mock-chunk-delay-ms": "100"}
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 200, "stream": True}
    with httpx.Client(timeout=10) as client:
        with client.stream("POST", gateway.url + "/v1/chat/completions", json=body, headers=headers) as resp:
            assert resp.status_code == 200
            assert resp.headers["x-ratelimit-limit-requests"] == "1"
            lines = resp.iter_lines()
            got = [line for line, _ in zip(lines, range(3))]
            assert got[0].startswith("data: ")
    # the connection is closed: the gateway must abort the upstream and release the lease
    wait_for("upstream aborted", lambda: mock_record(mock_upstream, mock_id).get("disconnected"), 5)
    wait_for("lease released", lambda: leases_of(redis_url, name) == 0, 5)
    billed = usage_of(redis_url, name).tokens_today
    assert 0 < billed < 200
    assert mock_record(mock_upstream, mock_id)["completed"] is False


def test_upstream_down_is_502(sdk, new_key, redis_url):
    key, name = new_key(contract.Limits(max_concurrent=1))
    with pytest.raises(openai.InternalServerError) as exc:
        sdk(key).chat.completions.create(model="down-model", messages=MESSAGES)
    assert exc.value.status_code == 502
    wait_for("lease released", lambda: leases_of(redis_url, name) == 0, 5)


def test_upstream_timeout_is_504_and_sent_once(sdk, new_key, mock_upstream, redis_url):
    key, name = new_key(contract.Limits(max_concurrent=1))
    mock_id = uuid.uuid4().hex
    with pytest.raises(openai.APIStatusError) as exc:
        sdk(key).chat.completions.create(
            model=MODEL, messages=MESSAGES, extra_headers={"x-mock-fail": "hang", "x-mock-id": mock_id}
        )
    assert exc.value.status_code == 504
    wait_for("lease released", lambda: leases_of(redis_url, name) == 0, 5)
    assert mock_record(mock_upstream, mock_id)["count"] == 1
    assert usage_of(redis_url, name).tokens_today == 0  # nothing was generated


def test_upstream_500_passed_through_and_never_retried(gateway, new_key, mock_upstream):
    key, _ = new_key()
    mock_id = uuid.uuid4().hex
    r = httpx.post(
        gateway.url + "/v1/chat/completions",
        json={"model": MODEL, "messages": MESSAGES},
        headers={"Authorization": f"Bearer {key}", "x-mock-fail": "500", "x-mock-id": mock_id},
    )
    assert r.status_code == 500
    assert mock_record(mock_upstream, mock_id)["count"] == 1


def test_sheddable_shed_under_saturation(gateway, new_key):
    critical, _ = new_key(priority="Critical")
    sheddable, _ = new_key(priority="Sheddable")
    url = gateway.url + "/v1/chat/completions"
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 100, "stream": True}
    slow = {"Authorization": f"Bearer {critical}", "x-mock-chunk-delay-ms": "50"}
    with httpx.Client(timeout=10) as client:
        with (
            client.stream("POST", url, json=body, headers=slow) as first,
            client.stream("POST", url, json=body, headers=slow) as second,
        ):
            assert first.status_code == second.status_code == 200  # 2 in flight = the threshold
            shed = httpx.post(
                url, json={"model": MODEL, "messages": MESSAGES}, headers={"Authorization": f"Bearer {sheddable}"}
            )
            assert shed.status_code == 503 and int(shed.headers["retry-after"]) >= 1
            assert shed.json()["error"]["type"] == "server_error"
            lowered = httpx.post(
                url,
                json={"model": MODEL, "messages": MESSAGES},
                headers={"Authorization": f"Bearer {critical}", "x-atlas-priority": "Sheddable"},
            )
            assert lowered.status_code == 503  # a header may lower the class
            ok = httpx.post(
                url,
                json={"model": MODEL, "messages": MESSAGES, "max_tokens": 2},
                headers={"Authorization": f"Bearer {critical}"},
            )
            assert ok.status_code == 200  # Critical is shed last


def test_metrics_labels_and_no_key_material(gateway, sdk, new_key):
    key, name = new_key()
    sdk(key).chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2)
    text = httpx.get(gateway.url + "/metrics").text
    assert f'key="team/{name}"' in text
    assert "atlas_gateway_overhead_seconds_bucket" in text
    assert "atlas_gateway_upstream_latency_seconds_bucket" in text
    assert key not in text and contract.hash_api_key(key) not in text
    assert key not in gateway.log()


def test_client_disconnect_aborts_non_streaming_request(gateway, new_key, mock_upstream, redis_url):
    key, name = new_key(contract.Limits(max_concurrent=1, tokens_per_day=100_000))
    mock_id = uuid.uuid4().hex
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            gateway.url + "/v1/chat/completions",
            timeout=0.4,
            json={"model": MODEL, "messages": MESSAGES, "max_tokens": 50},
            headers={"Authorization": f"Bearer {key}", "x-mock-fail": "hang", "x-mock-id": mock_id},
        )
    wait_for("upstream aborted", lambda: mock_record(mock_upstream, mock_id).get("disconnected"), 5)
    wait_for("lease released", lambda: leases_of(redis_url, name) == 0, 5)
    prompt_bound = (
        Meter.from_settings(Settings(upstream_url="http://unused"))
        .bound(route("chat"), {"model": MODEL, "messages": MESSAGES, "max_tokens": 50})
        .prompt
    )
    assert usage_of(redis_url, name).tokens_today == prompt_bound  # the prompt bound, no completion
    assert mock_record(mock_upstream, mock_id)["count"] == 1


def test_request_id_on_every_response(gateway):
    for method, path in (
        ("GET", "/healthz"),
        ("GET", "/readyz"),
        ("GET", "/v1/nope"),
        ("GET", "/nope"),
        ("GET", "/v1/chat/completions"),
        ("GET", "/v1/models"),
    ):
        r = httpx.request(method, gateway.url + path)
        assert r.headers.get("x-request-id"), (method, path, r.status_code)
    assert httpx.get(gateway.url + "/v1/nope").json()["error"]["code"] == "unknown_url"
    assert httpx.get(gateway.url + "/v1/chat/completions").status_code == 405


def test_usage_above_the_reservation_is_charged_in_full_and_counted(sdk, gateway, new_key, redis_url):
    key, name = new_key(contract.Limits(tokens_per_day=100_000))
    completion = sdk(key).chat.completions.create(  # an upstream that counts far more than the bound
        model=MODEL, messages=MESSAGES, max_tokens=5, extra_headers={"x-mock-prompt-tokens": "5000"}
    )
    assert completion.usage.total_tokens == 5005
    wait_for("charged in full", lambda: usage_of(redis_url, name).tokens_today == 5005, 5)
    metrics_text = httpx.get(gateway.url + "/metrics").text
    assert f'atlas_gateway_usage_overrun_total{{key="team/{name}"}} 1.0' in metrics_text


def test_the_cap_is_forwarded_even_when_the_client_sends_none(sdk, new_key, mock_upstream):
    key, _ = new_key(contract.Limits(tokens_per_day=100_000))
    mock_id = uuid.uuid4().hex
    raw = sdk(key).chat.completions.with_raw_response.create(
        model=MODEL, messages=MESSAGES, extra_headers={"x-mock-id": mock_id}
    )
    assert raw.headers["x-atlas-max-tokens"] == "256"  # this gateway's ATLAS_DEFAULT_MAX_TOKENS
    forwarded = mock_record(mock_upstream, mock_id)["body"]
    assert forwarded["max_tokens"] == forwarded["max_completion_tokens"] == 256
