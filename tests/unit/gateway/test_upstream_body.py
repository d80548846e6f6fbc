"""What goes upstream (upstream_body.py): only what Atlas must set is changed; members it only
adds are appended to the client's own bytes, which are never re-serialised for them; a cap field
the client sent makes the body re-serialised (one key each, whatever its bytes said)."""

from __future__ import annotations

import json

import pytest

from atlas_gateway.metering.body import UpstreamBody
from atlas_gateway.metering.validation import parse_body
from atlas_gateway.routes import route

PROMPT = "x" * 200_000 + " caf\u00e9 \u4e2d"  # a big prompt with non-ASCII text


def forwarded(
    doc: dict, raw: bytes | None = None, cap: int = 64, priority: int | None = None, name: str = "chat"
) -> tuple[UpstreamBody, bytes]:
    raw = raw if raw is not None else json.dumps(doc).encode() + b"\n"
    return UpstreamBody(route(name), parse_body(raw), raw, cap, priority), raw


def spliced(body: UpstreamBody, raw: bytes) -> bool:
    """The payload is the client's bytes up to its closing brace, with members after them."""
    end = raw.rindex(b"}")
    return body.payload[:end] == raw[:end] and body.payload != raw


@pytest.mark.parametrize("ensure_ascii", [True, False])  # \u-escaped non-ASCII text (older SDKs) or raw UTF-8
def test_a_big_streaming_prompt_is_spliced_not_re_serialised(ensure_ascii):
    doc = {"model": "m", "messages": [{"role": "user", "content": PROMPT}], "stream": True}
    raw = json.dumps(doc, ensure_ascii=ensure_ascii).encode()
    body, _ = forwarded(doc, raw)
    assert body.streaming and body.strip_usage
    assert spliced(body, raw)
    assert body.payload.endswith(
        b',"max_completion_tokens":64,"max_tokens":64,"stream_options":{"include_usage":true}}'
    )
    assert json.loads(body.payload) == {
        **doc,
        "max_completion_tokens": 64,
        "max_tokens": 64,
        "stream_options": {"include_usage": True},
    }


@pytest.mark.parametrize("ensure_ascii", [True, False])
def test_a_cap_field_the_client_sent_makes_the_body_re_serialised_with_one_key_each(ensure_ascii):
    doc = {"model": "m", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 64, "stream": True}
    raw = json.dumps(doc, ensure_ascii=ensure_ascii).encode()
    body, _ = forwarded(doc, raw)
    assert not spliced(body, raw) and body.strip_usage
    assert body.payload.count(b'"max_tokens"') == 1 and body.payload.count(b'"max_completion_tokens"') == 1
    assert json.loads(body.payload) == {**doc, "max_completion_tokens": 64, "stream_options": {"include_usage": True}}


def test_a_body_that_needs_nothing_is_forwarded_as_it_came():
    doc = {"model": "m", "input": "hi"}
    body, raw = forwarded(doc, name="embeddings")
    assert body.payload is raw and not body.strip_usage


@pytest.mark.parametrize("options", [None, {"include_usage": False}, {"continuous_usage_stats": True}])
def test_stream_options_present_without_include_usage_is_rewritten_with_one_key(options):
    doc = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True, "stream_options": options}
    body, raw = forwarded(doc)
    assert body.strip_usage and body.payload.count(b'"stream_options"') == 1
    assert json.loads(body.payload)["stream_options"] == {**(options or {}), "include_usage": True}


def test_forwarded_priority_is_appended_and_a_clients_own_is_replaced_or_removed():
    doc = {"model": "m", "input": "hi"}
    body, raw = forwarded(doc, name="embeddings", priority=2)
    assert spliced(body, raw) and json.loads(body.payload) == {**doc, "priority": 2}
    body, _ = forwarded({**doc, "priority": -100}, name="embeddings", priority=2)
    assert json.loads(body.payload) == {**doc, "priority": 2}
    body, _ = forwarded({**doc, "priority": -100}, name="embeddings")
    assert json.loads(body.payload) == doc


@pytest.mark.parametrize(
    "raw",
    [
        b'{"model":"m","messages":[{"role":"user","content":"hi"}],"max_tok\\u0065ns":5000,"max_tokens":64}',
        b'{"model":"m","messages":[{"role":"user","content":"hi"}],"max_tokens":5000,"max_tokens":64}',
    ],
)
def test_an_ambiguous_cap_is_re_serialised_with_one_key(raw):
    body, _ = forwarded({}, raw)
    assert body.payload.count(b'"max_tokens"') == 1 and json.loads(body.payload)["max_tokens"] == 64


def test_a_lowered_cap_is_rewritten():
    doc = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 800}
    body, _ = forwarded(doc, cap=200)
    assert json.loads(body.payload) == {**doc, "max_tokens": 200, "max_completion_tokens": 200}
