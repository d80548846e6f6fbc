"""Pure functions of the gateway (prompt bounds: test_tokens.py): error shapes, globs, priority, parsing."""

from __future__ import annotations

import json

import pytest

from atlas_gateway.globs import compile_globs, first_match
from atlas_gateway.http import errors
from atlas_gateway.http.headers import RequestHeaders, api_key_from_headers
from atlas_gateway.metering.events import StreamState, filter_events
from atlas_gateway.metering.usage import split_usage, usage_from_body
from atlas_gateway.metering.validation import parse_body, validate
from atlas_gateway.routes import route
from atlas_gateway.settings import Settings, SettingsError
from atlas_gateway.shedding.priority import effective_priority
from atlas_gateway.shedding.shedder import Shedder
from atlas_gateway.store.fastredis import ReplyError, pack, reply_reader
from atlas_gateway.upstream.targets import Upstreams

# ------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "err,status,type_,code",
    [
        (errors.invalid_api_key(), 401, "invalid_request_error", "invalid_api_key"),
        (errors.permission_denied("no"), 403, "permission_error", None),
        (errors.bad_request("bad", param="model"), 400, "invalid_request_error", None),
        (errors.body_too_large(10), 413, "invalid_request_error", "request_too_large"),
        (errors.rate_limited("requests", "slow down", 3), 429, "requests", "rate_limit_exceeded"),
        (errors.rate_limited("tokens", "slow down", 3), 429, "tokens", "rate_limit_exceeded"),
        (errors.quota_exhausted("spent", 60), 429, "insufficient_quota", "insufficient_quota"),
        (errors.shed(), 503, "server_error", "overloaded"),
        (errors.redis_unavailable(), 503, "server_error", "quota_store_unavailable"),
        (errors.upstream_unreachable(), 502, "server_error", "upstream_unreachable"),
        (errors.upstream_timeout(), 504, "server_error", "upstream_timeout"),
    ],
)
def test_error_shapes(err, status, type_, code):
    doc = json.loads(err.body())
    assert err.status == status
    assert set(doc["error"]) == {"message", "type", "param", "code"}
    assert doc["error"]["type"] == type_ and doc["error"]["code"] == code


def test_retry_after_headers():
    assert (b"retry-after", b"3") in errors.rate_limited("requests", "m", 3).headers
    quota = errors.quota_exhausted("m", 60).headers
    assert (b"retry-after", b"60") in quota and (b"x-should-retry", b"false") in quota


# ------------------------------------------------------------------------------ globs, upstreams


def test_globs():
    allow = compile_globs(("llama-3.1-8b-instruct", "qwen2.5-*"))
    assert allow("qwen2.5-7b-instruct") and allow("llama-3.1-8b-instruct")
    assert not allow("llama-3.1-70b") and not allow("QWEN2.5-7b")
    assert compile_globs(())("anything")
    assert compile_globs(("a*",)) is compile_globs(("a*",))  # compiled once


def test_upstream_map_first_match_and_default():
    ups = Upstreams("http://default:8000/v1/", (("qwen*", "http://qwen:8000"), ("*", "http://all:8000/v1")))
    assert ups.base_for("qwen2.5") == "http://qwen:8000"
    assert ups.base_for("llama") == "http://all:8000"
    assert Upstreams("http://d:1").base_for("x") == "http://d:1"
    assert first_match((("a*", "1"),), "b") is None


# ------------------------------------------------------------------------------ priority


@pytest.mark.parametrize(
    "key,header,expected",
    [
        ("Critical", None, "Critical"),
        ("Critical", "sheddable", "Sheddable"),
        ("Sheddable", "Critical", "Sheddable"),
        ("Standard", "Critical", "Standard"),
        ("Standard", "bogus", "Standard"),
        ("Standard", "Sheddable", "Sheddable"),
    ],
)
def test_priority_may_be_lowered_never_raised(key, header, expected):
    assert effective_priority(key, header) == expected


def test_shedding_order():
    shedder = Shedder(2, 4, 6)
    shedder.inflight = 2
    assert shedder.should_shed("Sheddable") and not shedder.should_shed("Standard")
    shedder.inflight = 4
    assert shedder.should_shed("Standard") and not shedder.should_shed("Critical")
    shedder.inflight = 6
    assert shedder.should_shed("Critical")
    assert not Shedder(0, 0, 0).should_shed("Sheddable")  # 0 disables


# ------------------------------------------------------------------------------ auth, validation


def test_api_key_extraction():
    assert api_key_from_headers([(b"authorization", b"Bearer sk-1")]) == "sk-1"
    assert api_key_from_headers([(b"authorization", b"bEaReR  sk-1 ")]) == "sk-1"
    assert api_key_from_headers([(b"x-api-key", b"sk-2")]) == "sk-2"
    assert api_key_from_headers([(b"authorization", b"Basic abc")]) is None
    assert api_key_from_headers([(b"authorization", b"Bearer   ")]) is None
    assert api_key_from_headers([(b"x-api-key", b"  ")]) is None
    assert api_key_from_headers([]) is None
    # a Bearer key wins over x-api-key, whichever comes first; the first usable one of each counts
    assert api_key_from_headers([(b"x-api-key", b"sk-2"), (b"authorization", b"Bearer sk-1")]) == "sk-1"
    assert api_key_from_headers([(b"authorization", b"Basic x"), (b"x-api-key", b"sk-2")]) == "sk-2"
    assert api_key_from_headers([(b"authorization", b"Bearer sk-1"), (b"authorization", b"Bearer sk-3")]) == "sk-1"
    assert api_key_from_headers([(b"x-api-key", b""), (b"x-api-key", b"sk-2"), (b"x-api-key", b"sk-4")]) == "sk-2"


def test_the_hot_path_header_parser_reads_controls_and_forwards_the_rest():
    """The hot path's one pass (proxy.py uses RequestHeaders with forward=True)."""
    parsed = RequestHeaders(
        [
            (b"host", b"gw"),
            (b"authorization", b"Bearer sk-1"),
            (b"x-api-key", b"sk-2"),
            (b"content-length", b"123"),
            (b"x-atlas-priority", b"Sheddable"),
            (b"accept-encoding", b"gzip"),
            (b"x-request-id", b"client-chosen"),
            (b"connection", b"keep-alive"),
            (b"openai-beta", b"x"),
            (b"x-custom", b"\xe9"),
        ],
        forward=True,
    )
    assert parsed.api_key == "sk-1" and parsed.priority == "Sheddable" and parsed.content_length == 123
    # credentials, hop-by-hop headers, our controls and the client's request id never go upstream
    assert parsed.forward == {"openai-beta": "x", "x-custom": "\xe9"}
    assert RequestHeaders([(b"content-length", b"-5")]).content_length == 0
    assert RequestHeaders([(b"content-length", b"12x")]).content_length == 0
    assert RequestHeaders([(b"openai-beta", b"x")]).forward == {}  # only collected when asked


def test_validation_errors_name_the_field():
    with pytest.raises(errors.GatewayError) as exc:
        parse_body(b"{not json")
    assert exc.value.status == 400
    with pytest.raises(errors.GatewayError) as exc:
        validate(route("chat"), {"model": "m", "messages": []})
    assert exc.value.param == "messages"
    with pytest.raises(errors.GatewayError) as exc:
        validate(route("chat"), {"model": "m", "messages": [{}], "max_tokens": -1})
    assert exc.value.param == "max_tokens"
    assert validate(route("embeddings"), {"model": "e", "input": "x"}) == "e"


# ------------------------------------------------------------------------------ usage / SSE


def test_usage_from_body():
    body = b'{"choices":[{"message":{"content":"\\"usage\\": x"}}],"usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}}'
    assert split_usage(usage_from_body(body)) == (3, 4, 7)
    assert usage_from_body(b'{"choices":[]}') is None


def _event(doc) -> bytes:
    return b"data: " + json.dumps(doc).encode() + b"\n\n"


def test_sse_filter_strips_injected_usage_chunk_only():
    block = (
        _event({"choices": [{"delta": {"content": "a"}}], "usage": None})
        + _event({"choices": [], "usage": {"prompt_tokens": 2, "completion_tokens": 1, "total_tokens": 3}})
        + b"data: [DONE]\n\n"
    )
    state = StreamState()
    out = filter_events(block, state, strip_usage=True)
    assert b'"prompt_tokens"' not in out and b"[DONE]" in out and b'"content": "a"' in out
    assert state.usage["total_tokens"] == 3 and state.delivered == 1
    kept = filter_events(block, StreamState(), strip_usage=False)
    assert kept == block


# ------------------------------------------------------------------------------ RESP, settings


def test_resp_pack_and_parse():
    assert pack((b"PING",)) == b"*1\r\n$4\r\nPING\r\n"
    reader = reply_reader()  # hiredis, with our error class
    reader.feed(b"*3\r\n:1\r\n:-1\r\n$3\r\nabc\r\n-NOSCRIPT x\r\n*2\r\n:1\r\n")
    assert reader.gets() == [1, -1, b"abc"]
    err = reader.gets()
    assert isinstance(err, ReplyError) and str(err).startswith("NOSCRIPT")
    assert reader.gets() is False  # the array is incomplete: wait for more bytes


def test_settings_from_env():
    with pytest.raises(SettingsError):
        Settings.from_env({})
    s = Settings.from_env(
        {
            "ATLAS_UPSTREAM_URL": "http://u",
            "ATLAS_FAIL_MODE": "open",
            "ATLAS_SHED_THRESHOLD": "10",
            "ATLAS_FORWARD_PRIORITY": "true",
            "ATLAS_UPSTREAM_MODELS": '{"q*": "http://q"}',
        }
    )
    assert s.fail_open and s.shed_thresholds() == (10, 11264, 12288)  # the others follow the pool
    assert s.forward_priority["Critical"] < s.forward_priority["Sheddable"]
    assert s.upstream_models == (("q*", "http://q"),)
    with pytest.raises(SettingsError):
        Settings.from_env({"ATLAS_UPSTREAM_URL": "http://u", "ATLAS_FAIL_MODE": "sometimes"})


def test_pre_encoded_script_call_equals_plain_encoding():
    from atlas_gateway.store.scripts import CallShape, FastScript

    script = FastScript(client=None, source="return 1")
    shape = CallShape((b"k1", b"k2"), (b"a", b"bcd", b""))
    dynamic, tail = (b"rid", b"12"), (b"1",)
    for _ in range(2):  # the first call encodes the shape, the second reuses that encoding
        assert script.encode(shape, dynamic) == pack(
            (b"EVALSHA", script.sha, b"2", b"k1", b"k2", *dynamic, b"a", b"bcd", b"")
        )
        assert script.encode(shape, dynamic, tail) == pack(
            (b"EVALSHA", script.sha, b"2", b"k1", b"k2", *dynamic, b"a", b"bcd", b"", b"1")
        )
    assert shape.encoded is not None


# ------------------------------------------------------------------------------- usage of every route


def test_split_usage_reads_every_routes_fields():
    assert split_usage({"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}) == (3, 4, 7)
    assert split_usage({"input_tokens": 5, "output_tokens": 6, "total_tokens": 11}) == (5, 6, 11)
    # Anthropic counts cache reads and writes apart from input_tokens
    assert split_usage(
        {"input_tokens": 5, "cache_read_input_tokens": 100, "cache_creation_input_tokens": 10, "output_tokens": 2}
    ) == (115, 2, 117)
    assert split_usage({"total_tokens": 42}) == (42, 0, 42)  # rerank: all prompt


def sse(event: str | None, doc: dict) -> bytes:
    head = f"event: {event}\n".encode() if event else b""
    return head + b"data: " + json.dumps(doc).encode() + b"\n\n"


def test_stream_usage_is_cumulative_and_the_last_value_wins():
    state = StreamState()
    filter_events(
        sse("message_start", {"type": "message_start", "message": {"usage": {"input_tokens": 9, "output_tokens": 1}}}),
        state,
        False,
    )
    filter_events(sse("content_block_delta", {"type": "content_block_delta", "delta": {"text": "x"}}), state, False)
    filter_events(sse("message_delta", {"type": "message_delta", "usage": {"output_tokens": 15}}), state, False)
    filter_events(sse("message_delta", {"type": "message_delta", "usage": {"output_tokens": 30}}), state, False)
    assert split_usage(state.usage) == (9, 30, 39)
    chat = StreamState()
    for done in (1, 2, 3):  # per-frame cumulative usage (continuous_usage_stats)
        filter_events(
            sse(
                None,
                {
                    "choices": [{"delta": {"content": "x"}}],
                    "usage": {"prompt_tokens": 4, "completion_tokens": done, "total_tokens": 4 + done},
                },
            ),
            chat,
            True,
        )
    assert split_usage(chat.usage) == (4, 3, 7) and chat.delivered == 3


def test_responses_stream_notes_the_id_and_the_terminal_usage():
    state = StreamState(want_id=True)
    filter_events(
        sse("response.created", {"type": "response.created", "response": {"id": "resp_1", "usage": None}}), state, False
    )
    filter_events(sse("response.output_text.delta", {"type": "response.output_text.delta", "delta": "x"}), state, False)
    filter_events(
        sse(
            "response.incomplete",
            {
                "type": "response.incomplete",
                "response": {"id": "resp_1", "usage": {"input_tokens": 7, "output_tokens": 3, "total_tokens": 10}},
            },
        ),
        state,
        False,
    )
    assert state.response_id == "resp_1" and split_usage(state.usage) == (7, 3, 10)


def test_shed_thresholds_follow_the_pool_and_never_exceed_it():
    base = {"ATLAS_UPSTREAM_URL": "http://u"}
    # an idle fleet of 10,000 long requests per process is not overload (issue 19)
    assert Settings.from_env(base).shed_thresholds() == (10240, 11264, 12288)
    assert min(Settings.from_env(base).shed_thresholds()) >= 10_000
    assert Settings.from_env({**base, "ATLAS_UPSTREAM_POOL_SIZE": "12"}).shed_thresholds() == (10, 11, 12)
    with pytest.raises(SettingsError, match="exceeds ATLAS_UPSTREAM_POOL_SIZE"):
        Settings.from_env({**base, "ATLAS_SHED_SCOPE": "process", "ATLAS_SHED_THRESHOLD_CRITICAL": "20000"})
    with pytest.raises(SettingsError, match="lower classes shed first"):
        Settings.from_env({**base, "ATLAS_SHED_THRESHOLD": "500", "ATLAS_SHED_THRESHOLD_STANDARD": "100"})
    assert Settings.from_env({**base, "ATLAS_SHED_THRESHOLD_CRITICAL": "0"}).shed_thresholds()[2] == 0
    with pytest.raises(SettingsError):
        Settings.from_env({**base, "ATLAS_BODY_TIMEOUT_SECONDS": "0"})


def test_cluster_scope_makes_explicit_thresholds_shared_totals():
    base = {"ATLAS_UPSTREAM_URL": "http://u", "ATLAS_UPSTREAM_POOL_SIZE": "100"}
    # unset: per-process defaults, nothing shared (no publishing)
    assert Settings.from_env(base).shed_limits() == ((83, 91, 100), (0, 0, 0))
    # set: a total over every process, which may exceed one process's pool; locally the pool
    s = Settings.from_env({**base, "ATLAS_SHED_THRESHOLD": "150"})
    assert s.shed_limits() == ((100, 91, 100), (150, 0, 0))
    assert Settings.from_env({**base, "ATLAS_SHED_THRESHOLD": "0"}).shed_limits() == ((0, 91, 100), (0, 0, 0))
    assert Settings.from_env({**base, "ATLAS_SHED_SCOPE": "process", "ATLAS_SHED_THRESHOLD": "10"}).shed_limits() == (
        (10, 91, 100),
        (0, 0, 0),
    )
    with pytest.raises(SettingsError, match="lower classes shed first"):
        Settings.from_env({**base, "ATLAS_SHED_THRESHOLD": "500", "ATLAS_SHED_THRESHOLD_STANDARD": "400"})
    with pytest.raises(SettingsError, match="ATLAS_SHED_SCOPE"):
        Settings.from_env({**base, "ATLAS_SHED_SCOPE": "galaxy"})


def test_shedder_adds_the_other_processes_and_falls_back_to_its_share():
    shedder = Shedder(100, 100, 100, shared=(10, 0, 0))
    shedder.inflight = 4
    assert not shedder.should_shed("Sheddable")
    shedder.others = 6  # the cluster-wide view: 4 + 6 reach the shared 10
    assert shedder.should_shed("Sheddable") and not shedder.should_shed("Standard")
    shedder.others, shedder.scale = 0, 3  # stale view, 3 processes last seen: 4 * 3 >= 10
    assert shedder.should_shed("Sheddable")
    shedder.inflight = 3
    assert not shedder.should_shed("Sheddable")
    shedder.inflight = 100  # the local pool guard, whatever the view
    assert shedder.should_shed("Critical")


def test_shedder_counts_requests_awaiting_admission():
    shedder = Shedder(1, 2, 3)
    shedder.admitting = 1
    assert shedder.should_shed("Sheddable") and not shedder.should_shed("Standard")


@pytest.mark.parametrize("depth,refused", [(64, False), (65, True), (900, True)])
def test_nesting_limit(depth, refused):
    body = b'{"model": "m", "messages": [{"role": "user", "content": "%s"}], "x": %s}' % (
        b"[" * 500,
        b"[" * (depth - 1) + b"]" * (depth - 1),
    )  # brackets in a string do not count
    if refused:
        with pytest.raises(errors.GatewayError) as exc:
            parse_body(body)
        assert exc.value.status == 400
    else:
        assert parse_body(body)["model"] == "m"


@pytest.mark.parametrize("depth", [65, 1100, 5000])
def test_nesting_beyond_the_limit_is_named_whatever_the_depth(depth):
    with pytest.raises(errors.GatewayError) as exc:
        parse_body(b'{"model":"m","x":' + b"[" * depth + b"]" * depth + b"}")
    assert exc.value.status == 400 and "deeper than 64" in exc.value.message


def test_a_long_flat_array_is_checked_by_its_brackets_not_walked_in_full():
    ids = list(range(50_000))  # past the walk budget: a token-id prompt
    assert parse_body(json.dumps({"model": "m", "prompt": ids}).encode())["prompt"] == ids
    deep = {"model": "m", "prompt": ids, "x": json.loads("[" * 70 + "]" * 70)}
    with pytest.raises(errors.GatewayError):
        parse_body(json.dumps(deep).encode())


@pytest.mark.parametrize("raw", [b'{"model":"m","t":NaN}', b'{"model":"m","s":"\\ud800"}', b'{"model":1} x', b""])
def test_what_is_not_json_is_a_400(raw):
    with pytest.raises(errors.GatewayError) as exc:
        parse_body(raw)
    assert exc.value.status == 400 and "not valid JSON" in exc.value.message


def test_a_started_process_freezes_its_heap_and_raises_the_collector_threshold():
    """runtime.settle_heap, in a process of its own (it would freeze pytest's heap here)."""
    import subprocess
    import sys

    code = (
        "import gc; from atlas_gateway.runtime import settle_heap; settle_heap(1234); "
        "print(gc.get_freeze_count() > 1000, gc.get_threshold()); settle_heap(0)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.split(None, 1) == ["True", "(1234, 10, 10)\n"]
    off = subprocess.run(
        [
            sys.executable,
            "-c",
            "import gc; from atlas_gateway.runtime import settle_heap; "
            "settle_heap(0); print(gc.get_freeze_count(), gc.get_threshold()[0])",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert off.stdout.split() == ["0", "700"]
