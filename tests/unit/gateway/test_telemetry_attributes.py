"""What a finished request says about itself: the span's attributes and the usage record
(telemetry/attributes.py), from request records built by hand."""

from __future__ import annotations

import json
from time import perf_counter
from types import SimpleNamespace

import pytest

from atlas_core import contract
from atlas_gateway.routes import route
from atlas_gateway.telemetry.attributes import client_trace_id, span_attributes, usage_record
from atlas_gateway.upstream.call import Bill

KEY = contract.KeyConfig("team", "search", "3f9a1c2b", contract.Limits(), quota="shared")
QUOTA = contract.QuotaConfig("team", "shared", contract.Limits())


def request(**changes) -> SimpleNamespace:
    principal = SimpleNamespace(ref=KEY.ref, quota=QUOTA)
    ticket = SimpleNamespace(principal=principal, reserved=120, cost=None, currency=None)
    fields = dict(
        method="POST",
        route=route("chat"),
        status=200,
        id="ab12-7",
        doc={"model": "llama"},
        principal=principal,
        priority="Standard",
        bound=SimpleNamespace(prompt=40, cap=80, sequences=1),
        reserve=120,
        shrunk=False,
        demoted=None,
        refused_by=None,
        ticket=ticket,
        billed=Bill(30, 12),
        cached=0,
        fail_open=False,
        response_model="llama-served",
        error=None,
        error_type=None,
        started=perf_counter() - 0.25,
    )
    fields.update(changes)
    return SimpleNamespace(**fields)


def test_a_served_request_has_the_genai_and_atlas_attributes():
    attrs = span_attributes(request())
    assert attrs == {
        "http.request.method": "POST",
        "http.route": "/v1/chat/completions",
        "http.response.status_code": 200,
        "gen_ai.operation.name": "chat",
        "gen_ai.request.model": "llama",
        "gen_ai.request.max_tokens": 80,
        "gen_ai.response.model": "llama-served",
        "gen_ai.usage.input_tokens": 30,
        "gen_ai.usage.output_tokens": 12,
        "atlas.request.id": "ab12-7",
        "atlas.key": "team/search",
        "atlas.quota": "team/shared",
        "atlas.priority": "Standard",
        "atlas.tokens.prompt_bound": 40,
        "atlas.tokens.reserved": 120,
        "atlas.tokens.settled": 42,
    }


def test_a_refused_request_names_the_limit_and_has_no_usage():
    attrs = span_attributes(
        request(
            status=429,
            ticket=None,
            refused_by=("tokens_per_day", "AtlasQuota team/shared"),
            error_type="insufficient_quota",
            response_model=None,
        )
    )
    assert attrs["atlas.refused.limit"] == "tokens_per_day" and attrs["atlas.refused.by"] == "AtlasQuota team/shared"
    assert attrs["error.type"] == "insufficient_quota"
    assert not [name for name in attrs if name.startswith("gen_ai.usage")]


def test_an_unknown_key_names_no_key():
    attrs = span_attributes(
        request(
            status=401,
            principal=None,
            ticket=None,
            bound=None,
            reserve=0,
            priority="",
            doc={},
            error_type="invalid_api_key",
            response_model=None,
        )
    )
    assert "atlas.key" not in attrs and "gen_ai.request.model" not in attrs
    assert attrs["error.type"] == "invalid_api_key"


def test_shrink_cost_cache_and_fail_open_show():
    ticket = SimpleNamespace(principal=request().principal, reserved=60, cost=1_234_567, currency="EUR")
    attrs = span_attributes(request(shrunk=True, cached=8, ticket=ticket))
    assert attrs["atlas.shrink"] is True and attrs["gen_ai.usage.cache_read.input_tokens"] == 8
    assert (attrs["atlas.cost"], attrs["atlas.cost.currency"]) == ("1.234567", "EUR")
    assert span_attributes(request(ticket=None, fail_open=True))["atlas.fail_open"] is True


def test_a_demoted_request_names_the_soft_budget():
    attrs = span_attributes(request(priority="Sheddable", demoted="softTokensPerDay"))
    assert (attrs["atlas.priority"], attrs["atlas.demoted"]) == ("Sheddable", "softTokensPerDay")
    assert "atlas.demoted" not in span_attributes(request())


def test_the_operation_comes_from_the_route_table():
    assert [
        span_attributes(request(route=route(name)))["gen_ai.operation.name"]
        for name in ("chat", "completions", "embeddings", "responses", "messages", "rerank")
    ] == ["chat", "text_completion", "embeddings", "chat", "chat", "rerank"]


def test_a_request_settled_before_its_upstream_call_was_charged_nothing():
    record = usage_record(request(billed=None, status=500), None)
    assert (record["promptTokens"], record["completionTokens"], record["status"]) == (0, 0, 500)


def test_the_usage_record_has_the_documented_fields_and_no_key_material():
    ticket = SimpleNamespace(principal=request().principal, reserved=120, cost=2_500, currency="USD")
    record = usage_record(request(ticket=ticket, cached=5), "4bf92f3577b34da6a3ce929d0e0e4736")
    assert record.pop("time").endswith("Z") and 249 <= record.pop("durationMs") < 10_000
    assert record == {
        "requestId": "ab12-7",
        "traceId": "4bf92f3577b34da6a3ce929d0e0e4736",
        "key": "team/search",
        "quota": "team/shared",
        "model": "llama",
        "route": "/v1/chat/completions",
        "status": 200,
        "promptTokens": 30,
        "completionTokens": 12,
        "cachedTokens": 5,
        "reservedTokens": 120,
        "cost": "0.0025",
        "currency": "USD",
    }
    assert "3f9a1c2b" not in json.dumps(record)


@pytest.mark.parametrize(
    "header, trace_id",
    [
        ("00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01", "4bf92f3577b34da6a3ce929d0e0e4736"),
        ("00-00000000000000000000000000000000-00f067aa0ba902b7-01", None),  # all zeros: invalid
        ("00-4bf92f3577b34da6a3ce929d0e0e473z-00f067aa0ba902b7-01", None),
        ("garbage", None),
    ],
)
def test_the_clients_trace_id(header, trace_id):
    assert client_trace_id({"traceparent": header}) == trace_id
    assert client_trace_id({}) is None
