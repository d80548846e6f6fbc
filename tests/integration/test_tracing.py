"""Traces and usage records through a real gateway process, a real redis-server, the mock
upstream and a real Jaeger (all-in-one, memory storage): every trace is read back from Jaeger's
query API, the traceparent the upstream received from the mock's request log, usage records from
the gateway's stdout (JSON lines) or from a local OTLP/HTTP log receiver (Jaeger stores no logs).
"""

from __future__ import annotations

import json
import secrets

import httpx
import openai
import pytest

from atlas_core import contract
from atlas_devstack.jaeger import attributes
from atlas_devstack.waiting import wait_for
from tests.fixtures.gateway import GatewayProcess, write_key
from tests.fixtures.otlp_receiver import OtlpLogReceiver

MODEL = "llama-3.1-8b-instruct"
SERVER_SPAN = "POST /v1/chat/completions"
KIND_SERVER, KIND_CLIENT = 2, 3
STATUS_ERROR = 2
# exporters batch: send within 50 ms instead of 5 s, so a test waits for its spans briefly
FAST_EXPORT = {"OTEL_BSP_SCHEDULE_DELAY": "50", "OTEL_BLRP_SCHEDULE_DELAY": "50"}


@pytest.fixture(scope="module")
def traced(redis_server, mock_upstream, jaeger, tmp_path_factory):
    """One gateway tracing every request to Jaeger over OTLP/HTTP, usage records on stdout."""
    gw = GatewayProcess(
        redis_server.url,
        mock_upstream.url,
        tmp_path_factory.mktemp("traced"),
        OTEL_EXPORTER_OTLP_ENDPOINT=jaeger.otlp_http_url,
        OTEL_SERVICE_NAME="atlas-gateway-it",
        ATLAS_USAGE_RECORDS="stdout",
        ATLAS_LOG_LEVEL="warning",
        **FAST_EXPORT,
    ).start()
    yield gw
    gw.stop()


def new_key(redis_server, limits: contract.Limits | None = None, **fields) -> tuple[str, str]:
    """(API key, AtlasKey name) of a fresh key bound to a fresh AtlasQuota in namespace ``team``."""
    name = "k" + secrets.token_hex(4)
    api_key = "sk-trace-" + secrets.token_hex(16)
    write_key(redis_server.url, api_key, name, limits, quota="q-" + name, quota_limits=contract.Limits(), **fields)
    return api_key, name


def traceparent(sampled: bool = True) -> tuple[str, str, str]:
    trace_id, parent_id = secrets.token_hex(16), secrets.token_hex(8)
    return f"00-{trace_id}-{parent_id}-{'01' if sampled else '00'}", trace_id, parent_id


def upstream_saw(mock_upstream, mock_id: str) -> dict:
    return httpx.get(f"{mock_upstream.url}/_mock/requests/{mock_id}", timeout=5).json()


def usage_records(gw: GatewayProcess, key_name: str) -> list[dict]:
    records = []
    for line in gw.log().splitlines():
        if line.startswith("{") and '"requestId"' in line:
            record = json.loads(line)
            if record["key"] == f"team/{key_name}":
                records.append(record)
    return records


def one(spans: list[dict], name: str) -> dict:
    found = [s for s in spans if s["name"] == name]
    assert len(found) == 1, f"{name}: {[s['name'] for s in spans]}"
    return found[0]


def test_a_request_is_a_server_span_under_the_clients_traceparent_and_the_upstream_continues_it(
    traced, jaeger, redis_server, mock_upstream
):
    api_key, name = new_key(redis_server)
    header, trace_id, client_span = traceparent()
    mock_id = secrets.token_hex(6)
    client = openai.OpenAI(base_url=traced.url + "/v1", api_key=api_key, max_retries=0)
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL,
        messages=[{"role": "user", "content": "hello there"}],
        max_tokens=16,
        extra_headers={"traceparent": header, "x-mock-id": mock_id},
    )
    completion = raw.parse()

    spans = jaeger.wait_for_spans(trace_id, 4)
    server = one(spans, SERVER_SPAN)
    assert server["kind"] == KIND_SERVER and server["parentSpanId"] == client_span
    upstream = one(spans, f"chat {MODEL}")
    admission, settlement = one(spans, "atlas.admission"), one(spans, "atlas.settlement")
    for child in (upstream, admission, settlement):
        assert child["parentSpanId"] == server["spanId"], child["name"]
    assert upstream["kind"] == KIND_CLIENT
    # in order: admitted, then forwarded, then settled (the server span covers them all)
    assert int(admission["endTimeUnixNano"]) <= int(upstream["startTimeUnixNano"])
    assert int(upstream["endTimeUnixNano"]) <= int(settlement["startTimeUnixNano"])
    assert int(server["startTimeUnixNano"]) <= int(admission["startTimeUnixNano"])
    assert int(settlement["endTimeUnixNano"]) <= int(server["endTimeUnixNano"])

    # the upstream's traceparent: same trace, parent = the gateway's upstream span, sampled
    assert upstream_saw(mock_upstream, mock_id)["headers"]["traceparent"] == f"00-{trace_id}-{upstream['spanId']}-01"

    attrs = attributes(server)
    usage = completion.usage
    assert attrs["gen_ai.operation.name"] == "chat"
    assert attrs["gen_ai.request.model"] == MODEL
    assert attrs["gen_ai.request.max_tokens"] == 16
    assert attrs["gen_ai.response.model"] == completion.model
    assert attrs["gen_ai.usage.input_tokens"] == usage.prompt_tokens
    assert attrs["gen_ai.usage.output_tokens"] == usage.completion_tokens
    assert attrs["atlas.key"] == f"team/{name}" and attrs["atlas.quota"] == f"team/q-{name}"
    assert attrs["atlas.priority"] == "Standard"
    assert attrs["atlas.tokens.reserved"] >= usage.total_tokens
    assert attrs["atlas.tokens.settled"] == usage.total_tokens
    assert attrs["atlas.request.id"] == raw.headers["x-request-id"]
    assert attrs["http.response.status_code"] == 200
    assert server.get("status", {}).get("code", 0) != STATUS_ERROR
    assert attributes(server["resource"])["service.name"] == "atlas-gateway-it"
    assert api_key not in json.dumps(spans), "key material in a trace"

    [record] = usage_records(traced, name)
    assert record["traceId"] == trace_id and record["requestId"] == raw.headers["x-request-id"]
    assert (record["promptTokens"], record["completionTokens"]) == (usage.prompt_tokens, usage.completion_tokens)


def test_a_stream_is_one_span_that_ends_with_the_stream_and_carries_its_usage(traced, jaeger, redis_server):
    api_key, name = new_key(redis_server)
    header, trace_id, _ = traceparent()
    client = openai.OpenAI(base_url=traced.url + "/v1", api_key=api_key, max_retries=0)
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "stream please"}],
        max_tokens=12,
        stream=True,
        stream_options={"include_usage": True},
        extra_headers={"traceparent": header, "x-mock-chunk-delay-ms": "20", "x-mock-completion-tokens": "8"},
    )
    chunks = list(stream)
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens == 8

    spans = jaeger.wait_for_spans(trace_id, 4)
    server, upstream = one(spans, SERVER_SPAN), one(spans, f"chat {MODEL}")
    attrs = attributes(server)
    assert attrs["gen_ai.usage.output_tokens"] == 8
    assert attrs["gen_ai.usage.input_tokens"] == usage.prompt_tokens
    assert attrs["gen_ai.response.model"] == MODEL
    # the upstream span lasts the whole stream (8 chunks, 20 ms apart), the server span longer
    assert int(upstream["endTimeUnixNano"]) - int(upstream["startTimeUnixNano"]) >= 8 * 20_000_000 * 0.8
    assert int(server["endTimeUnixNano"]) >= int(upstream["endTimeUnixNano"])
    [record] = usage_records(traced, name)
    assert record["completionTokens"] == 8 and record["traceId"] == trace_id


def test_a_refused_request_is_an_error_span_naming_the_limit_and_has_no_usage_record(
    traced, jaeger, redis_server, mock_upstream
):
    api_key, name = new_key(redis_server, contract.Limits(tokens_per_day=50))
    header, trace_id, _ = traceparent()
    mock_id = secrets.token_hex(6)
    resp = httpx.post(
        traced.url + "/v1/chat/completions",
        timeout=10,
        json={"model": MODEL, "max_tokens": 500, "messages": [{"role": "user", "content": "hi"}]},
        headers={"authorization": f"Bearer {api_key}", "traceparent": header, "x-mock-id": mock_id},
    )
    assert resp.status_code == 429, resp.text

    spans = jaeger.wait_for_spans(trace_id, 2)
    server = one(spans, SERVER_SPAN)
    one(spans, "atlas.admission")
    assert not [s for s in spans if s["kind"] == KIND_CLIENT], "a refused request never reaches the upstream"
    assert server["status"]["code"] == STATUS_ERROR
    assert server["status"]["message"] == resp.json()["error"]["message"]
    attrs = attributes(server)
    assert attrs["http.response.status_code"] == 429
    assert attrs["atlas.refused.by"] == f"AtlasKey team/{name}"
    assert attrs["atlas.refused.limit"] == "tokens_per_day"  # as the rejections metric names it
    assert attrs["error.type"] == "insufficient_quota"
    assert upstream_saw(mock_upstream, mock_id)["count"] == 0
    assert usage_records(traced, name) == []  # nothing was settled


def test_a_request_past_a_soft_budget_is_a_sheddable_span_naming_it(traced, jaeger, redis_server):
    api_key, name = new_key(redis_server, contract.Limits(soft_tokens_per_day=1), priority="Critical")
    url = traced.url + "/v1/chat/completions"
    body = {"model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}
    assert httpx.post(url, json=body, headers={"authorization": f"Bearer {api_key}"}, timeout=10).status_code == 200

    def demoted() -> tuple[httpx.Response, str] | None:  # once that first request is settled
        header, trace_id, _ = traceparent()
        resp = httpx.post(
            url, json=body, timeout=10, headers={"authorization": f"Bearer {api_key}", "traceparent": header}
        )
        return (resp, trace_id) if "x-atlas-demoted" in resp.headers else None

    resp, trace_id = wait_for("a demoted answer", demoted, 10)
    attrs = attributes(one(jaeger.wait_for_spans(trace_id, 3), SERVER_SPAN))
    assert (attrs["atlas.demoted"], attrs["atlas.priority"]) == ("softTokensPerDay", "Sheddable")


def test_an_unknown_key_is_an_error_span_that_names_no_key(traced, jaeger):
    header, trace_id, _ = traceparent()
    secret = "sk-unknown-" + secrets.token_hex(16)
    resp = httpx.post(
        traced.url + "/v1/chat/completions",
        timeout=10,
        json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]},
        headers={"authorization": f"Bearer {secret}", "traceparent": header},
    )
    assert resp.status_code == 401
    [server] = jaeger.wait_for_spans(trace_id, 1)
    assert server["status"]["code"] == STATUS_ERROR
    attrs = attributes(server)
    assert attrs["error.type"] == "invalid_api_key" and "atlas.key" not in attrs
    assert secret not in json.dumps(server)


def test_an_upstream_failure_is_an_error_on_the_upstream_span_and_the_request(traced, jaeger, redis_server):
    api_key, name = new_key(redis_server)
    header, trace_id, _ = traceparent()
    resp = httpx.post(
        traced.url + "/v1/chat/completions",
        timeout=10,
        json={"model": MODEL, "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]},
        headers={"authorization": f"Bearer {api_key}", "traceparent": header, "x-mock-fail": "500"},
    )
    assert resp.status_code == 500
    spans = jaeger.wait_for_spans(trace_id, 4)
    server, upstream = one(spans, SERVER_SPAN), one(spans, f"chat {MODEL}")
    assert server["status"]["code"] == STATUS_ERROR and upstream["status"]["code"] == STATUS_ERROR
    assert attributes(server)["http.response.status_code"] == 500
    [record] = usage_records(traced, name)  # admitted, so settled (for nothing generated)
    assert record["status"] == 500 and record["completionTokens"] == 0


def test_without_a_traceparent_the_gateway_starts_the_trace(traced, jaeger, redis_server, mock_upstream):
    api_key, name = new_key(redis_server)
    mock_id = secrets.token_hex(6)
    resp = httpx.post(
        traced.url + "/v1/embeddings",
        timeout=10,
        json={"model": MODEL, "input": "a b c"},
        headers={"authorization": f"Bearer {api_key}", "x-mock-id": mock_id},
    )
    assert resp.status_code == 200
    [record] = wait_for("the usage record", lambda: usage_records(traced, name), 10)
    spans = jaeger.wait_for_spans(record["traceId"], 4)
    server = one(spans, "POST /v1/embeddings")
    assert not server.get("parentSpanId")
    assert attributes(server)["gen_ai.operation.name"] == "embeddings"
    upstream = one(spans, f"embeddings {MODEL}")
    sent = upstream_saw(mock_upstream, mock_id)["headers"]["traceparent"]
    assert sent[:-2] == f"00-{record['traceId']}-{upstream['spanId']}-"
    assert int(sent[-2:], 16) & 1  # sampled (the SDK also sets Level 2's "random" bit on a new trace id)


def test_sampling_follows_the_sampler_and_the_clients_decision(redis_server, mock_upstream, jaeger, tmp_path_factory):
    """1 in 0 sampled at the gateway: a request without a parent is not recorded, yet the upstream
    gets the gateway's traceparent marked not-sampled (its own sampler follows); a client's
    sampled parent is followed (parentbased_)."""
    gw = GatewayProcess(
        redis_server.url,
        mock_upstream.url,
        tmp_path_factory.mktemp("sampled"),
        OTEL_EXPORTER_OTLP_ENDPOINT=jaeger.otlp_http_url,
        OTEL_TRACES_SAMPLER="parentbased_traceidratio",
        OTEL_TRACES_SAMPLER_ARG="0",
        ATLAS_USAGE_RECORDS="stdout",
        ATLAS_LOG_LEVEL="warning",
        **FAST_EXPORT,
    ).start()
    try:
        api_key, name = new_key(redis_server)
        auth = {"authorization": f"Bearer {api_key}"}
        body = {"model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}
        mock_id = secrets.token_hex(6)
        assert (
            httpx.post(
                gw.url + "/v1/chat/completions", json=body, headers={**auth, "x-mock-id": mock_id}, timeout=10
            ).status_code
            == 200
        )
        sent = upstream_saw(mock_upstream, mock_id)["headers"]["traceparent"]
        assert int(sent[-2:], 16) & 1 == 0, sent  # W3C flags: the sampled bit is off
        unsampled_trace = sent[3:35]
        header, sampled_trace, client_span = traceparent(sampled=True)
        assert (
            httpx.post(
                gw.url + "/v1/chat/completions", json=body, headers={**auth, "traceparent": header}, timeout=10
            ).status_code
            == 200
        )
        spans = jaeger.wait_for_spans(sampled_trace, 4)
        assert one(spans, SERVER_SPAN)["parentSpanId"] == client_span
        # exported in order: once the later trace is in, the earlier one would be too
        assert jaeger.trace(unsampled_trace) == []
        # the usage record still names the trace the upstream was told about
        records = wait_for(
            "both usage records", lambda: len(usage_records(gw, name)) == 2 and usage_records(gw, name), 10
        )
        assert [r["traceId"] for r in records] == [unsampled_trace, sampled_trace]
    finally:
        gw.stop()


def test_traces_over_otlp_grpc(redis_server, mock_upstream, jaeger, tmp_path_factory):
    gw = GatewayProcess(
        redis_server.url,
        mock_upstream.url,
        tmp_path_factory.mktemp("grpc"),
        OTEL_EXPORTER_OTLP_ENDPOINT=jaeger.otlp_grpc_url,
        OTEL_EXPORTER_OTLP_PROTOCOL="grpc",
        ATLAS_LOG_LEVEL="warning",
        **FAST_EXPORT,
    ).start()
    try:
        api_key, _ = new_key(redis_server)
        header, trace_id, _ = traceparent()
        assert (
            httpx.post(
                gw.url + "/v1/chat/completions",
                timeout=10,
                json={"model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]},
                headers={"authorization": f"Bearer {api_key}", "traceparent": header},
            ).status_code
            == 200
        )
        spans = jaeger.wait_for_spans(trace_id, 4)
        assert attributes(one(spans, SERVER_SPAN))["http.response.status_code"] == 200
    finally:
        gw.stop()


def test_usage_records_as_otlp_log_records_linked_to_the_span(redis_server, mock_upstream, jaeger, tmp_path_factory):
    """Traces to Jaeger, usage records to a local OTLP/HTTP receiver (per-signal endpoints)."""
    with OtlpLogReceiver() as receiver:
        gw = GatewayProcess(
            redis_server.url,
            mock_upstream.url,
            tmp_path_factory.mktemp("otlp-logs"),
            OTEL_EXPORTER_OTLP_TRACES_ENDPOINT=jaeger.otlp_http_url + "/v1/traces",
            OTEL_EXPORTER_OTLP_LOGS_ENDPOINT=receiver.url + "/v1/logs",
            ATLAS_USAGE_RECORDS="otlp",
            ATLAS_LOG_LEVEL="warning",
            **FAST_EXPORT,
        ).start()
        try:
            api_key, name = new_key(redis_server)
            header, trace_id, _ = traceparent()
            resp = httpx.post(
                gw.url + "/v1/chat/completions",
                timeout=10,
                json={"model": MODEL, "max_tokens": 6, "messages": [{"role": "user", "content": "hi"}]},
                headers={"authorization": f"Bearer {api_key}", "traceparent": header},
            )
            assert resp.status_code == 200
            usage = resp.json()["usage"]
            [record] = wait_for("the OTLP usage record", receiver.snapshot, 10)
            server = one(jaeger.wait_for_spans(trace_id, 4), SERVER_SPAN)
        finally:
            gw.stop()
    assert record["event_name"] == "atlas.usage"
    assert (record["trace_id"], record["span_id"]) == (trace_id, server["spanId"])
    attrs = record["attributes"]
    assert attrs["atlas.usage.key"] == f"team/{name}" and attrs["atlas.usage.quota"] == f"team/q-{name}"
    assert attrs["atlas.usage.requestId"] == resp.headers["x-request-id"]
    assert attrs["atlas.usage.promptTokens"] == usage["prompt_tokens"]
    assert attrs["atlas.usage.completionTokens"] == usage["completion_tokens"]
    assert attrs["atlas.usage.status"] == 200 and attrs["atlas.usage.route"] == "/v1/chat/completions"
    assert record["resource"]["service.name"] == "atlas-gateway"
    assert api_key not in json.dumps(record)


def test_usage_records_as_json_lines_one_per_settled_request(traced, redis_server):
    price_list = contract.PriceTable("usd", "USD", (contract.Price("*", 1_000_000, 500_000, 2_000_000),))
    api_key, name = new_key(redis_server, price_list=price_list)
    auth = {"authorization": f"Bearer {api_key}"}
    body = {"model": MODEL, "max_tokens": 10, "messages": [{"role": "user", "content": "count me"}]}
    answers = [httpx.post(traced.url + "/v1/chat/completions", json=body, headers=auth, timeout=10) for _ in range(2)]
    assert [a.status_code for a in answers] == [200, 200]
    assert (
        httpx.post(traced.url + "/v1/chat/completions", json={"model": MODEL}, headers=auth, timeout=10).status_code
        == 400
    )  # refused before admission: no record
    records = wait_for(
        "two usage records", lambda: len(usage_records(traced, name)) >= 2 and usage_records(traced, name), 10
    )
    assert len(records) == 2
    for record, answer in zip(records, answers):
        usage = answer.json()["usage"]
        assert set(record) == {
            "time",
            "requestId",
            "traceId",
            "key",
            "quota",
            "model",
            "route",
            "status",
            "promptTokens",
            "completionTokens",
            "cachedTokens",
            "reservedTokens",
            "cost",
            "currency",
            "durationMs",
        }
        assert record["requestId"] == answer.headers["x-request-id"]
        assert record["quota"] == f"team/q-{name}" and record["model"] == MODEL
        assert record["route"] == "/v1/chat/completions" and record["status"] == 200
        assert record["promptTokens"] == usage["prompt_tokens"]
        assert record["completionTokens"] == usage["completion_tokens"]
        assert record["reservedTokens"] >= usage["total_tokens"]
        # 1 USD per million input tokens, 2 per million output
        micro = usage["prompt_tokens"] * 1 + usage["completion_tokens"] * 2
        assert record["currency"] == "USD" and record["cost"] == contract.format_micro(micro)
        assert record["durationMs"] > 0 and record["time"].endswith("Z")
    assert api_key not in traced.log()
