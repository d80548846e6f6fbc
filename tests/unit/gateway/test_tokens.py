"""The prompt bound and the completion cap (tokens.py): every request shape, and refusals."""

from __future__ import annotations

import json

import pytest

from atlas_gateway.http import errors
from atlas_gateway.metering.bounds import Meter, apply_cap, cap_patch, rendered_len, utf8_len
from atlas_gateway.routes import route

METER = Meter(default_cap=100, per_request=10, per_message=5, per_prompt=2, media_part=300)


def chat(*messages, **fields):
    return {"model": "m", "messages": list(messages), **fields}


def test_text_is_bounded_by_its_utf8_bytes():
    assert utf8_len("abc") == 3
    assert utf8_len("日本語") == 9
    assert utf8_len("😀") == 4


@pytest.mark.parametrize(
    "value",
    [
        {"a": [1, 2.5, None, True], "b": {"c": 'x"y\n', "d": []}, "e": {}},
        [
            {
                "type": "function",
                "function": {
                    "name": "f",
                    "parameters": {
                        "type": "object",
                        "properties": {"q": {"type": "string", "description": "日本語 — query"}},
                    },
                },
            }
        ],
        "plain",
        12,
        None,
        [],
    ],
)
def test_rendered_len_is_the_indent_4_rendering(value):
    assert rendered_len(value) == len(json.dumps(value, indent=4, ensure_ascii=False).encode())
    # which also bounds the compact and the default-separator renderings templates use
    assert rendered_len(value) >= len(json.dumps(value, ensure_ascii=False).encode())


def test_chat_bound_counts_roles_content_and_template_allowances():
    bound = METER.bound(route("chat"), chat({"role": "user", "content": "hello"}))
    assert bound.prompt == 10 + 5 + len("user") + len("hello")
    assert (bound.cap, bound.sequences) == (100, 1)  # no cap sent: the default


def test_chat_tools_tool_calls_and_tool_results_are_counted_as_rendered():
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]
    calls = [{"id": "c1", "type": "function", "function": {"name": "lookup", "arguments": '{"q": "x"}'}}]
    body = chat(
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": None, "tool_calls": calls},
        {"role": "tool", "tool_call_id": "c1", "content": "result text"},
        tools=tools,
    )
    bound = METER.bound(route("chat"), body)
    expected = (
        10
        + 3 * 5
        + len("user")
        + 2
        + len("assistant")
        + rendered_len(calls)
        + len("tool")
        + len("c1")
        + len("result text")
        + rendered_len(tools)
    )
    assert bound.prompt == expected


def test_media_parts_count_the_configured_allowance_each():
    parts = [
        {"type": "text", "text": "abc"},
        {"type": "image_url", "image_url": {"url": "http://x/1.png"}},
        {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}},
    ]
    bound = METER.bound(route("chat"), chat({"role": "user", "content": parts}))
    assert bound.prompt == 10 + 5 + 4 + (3 + 1) + 2 * 300


@pytest.mark.parametrize(
    "body, param",
    [
        (
            chat({"role": "user", "content": [{"type": "file", "file": {"file_id": "f"}}]}),
            "messages[0].content[0].type",
        ),
        (chat({"role": "user", "content": [{"text": "no type"}]}), "messages[0].content[0].type"),
        (chat({"role": "user", "content": [{"type": "text", "text": 5}]}), "messages[0].content[0].text"),
        (chat({"role": "user", "content": 42}), "messages[0].content"),
        (chat("just a string"), "messages[0]"),
        (chat({"role": "user", "content": "x"}, chat_template="{{ messages * 100 }}"), "chat_template"),
        (chat({"role": "user", "content": "x"}, tools=[{"type": "web_search"}]), "tools[0].type"),
    ],
)
def test_what_cannot_be_bounded_is_a_400_naming_the_field(body, param):
    with pytest.raises(errors.GatewayError) as exc:
        METER.bound(route("chat"), body)
    assert exc.value.status == 400 and exc.value.param == param


def test_caps_smallest_positive_wins_zero_means_absent():
    m = {"role": "user", "content": "x"}
    assert METER.bound(route("chat"), chat(m, max_completion_tokens=0, max_tokens=1000)).cap == 1000
    assert METER.bound(route("chat"), chat(m, max_completion_tokens=7, max_tokens=99)).cap == 7
    assert METER.bound(route("chat"), chat(m, max_completion_tokens=99, max_tokens=7)).cap == 7
    assert METER.bound(route("chat"), chat(m, max_tokens=0)).cap == 100


def test_choices_multiply_the_completion_part():
    m = {"role": "user", "content": "x"}
    assert METER.bound(route("chat"), chat(m, n=3, max_tokens=10)).sequences == 3
    bound = METER.bound(route("completions"), {"prompt": "abc", "n": 2, "best_of": 5, "max_tokens": 10})
    assert (bound.prompt, bound.cap, bound.sequences, bound.reserve) == (3 + 2, 10, 5, 55)


def test_batched_and_token_prompts():
    batch = METER.bound(route("completions"), {"prompt": ["ab"] * 100, "max_tokens": 20, "n": 2})
    assert (batch.prompt, batch.sequences, batch.reserve) == (100 * (2 + 2), 200, 400 + 4000)
    assert METER.bound(route("completions"), {"prompt": [1, 2, 3], "max_tokens": 5}).reserve == 3 + 5
    assert METER.bound(route("completions"), {"prompt": [[1, 2], [3]], "max_tokens": 5}).reserve == 3 + 10
    assert METER.bound(route("completions"), {"prompt": "ab", "suffix": "cd", "max_tokens": 1}).prompt == 2 + 2 + 2
    emb = METER.bound(route("embeddings"), {"input": ["abc", "abcdef", [7, 8]]})
    assert (emb.prompt, emb.sequences, emb.reserve) == (5 + 8 + 2, 0, 15)


@pytest.mark.parametrize(
    "prompt, param",
    [
        ([], "prompt"),
        ([1, "a"], "prompt"),
        (["a", 3], "prompt[1]"),
        ([[1], []], "prompt[1]"),
        ([{"x": 1}], "prompt[0]"),
        ([True], "prompt[0]"),
    ],
)
def test_unknown_prompt_shapes_are_refused(prompt, param):
    with pytest.raises(errors.GatewayError) as exc:
        METER.bound(route("completions"), {"prompt": prompt})
    assert exc.value.status == 400 and exc.value.param == param


def test_responses_bound():
    body = {
        "model": "m",
        "instructions": "be brief",
        "max_output_tokens": 30,
        "input": [
            {
                "role": "user",
                "content": [{"type": "input_text", "text": "hello"}, {"type": "input_image", "image_url": "http://x"}],
            },
            {"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "c", "output": "42"},
        ],
    }
    bound = METER.bound(route("responses"), body, previous_tokens=1000)
    expected = (
        10
        + 5
        + len("be brief")
        + 5
        + 4
        + 6
        + 300
        + 5
        + rendered_len(body["input"][1])
        + 5
        + rendered_len(body["input"][2])
        + 1000
    )
    assert (bound.prompt, bound.cap, bound.sequences) == (expected, 30, 1)
    assert METER.bound(route("responses"), {"model": "m", "input": "hi"}).prompt == 10 + 5 + 2


@pytest.mark.parametrize(
    "field, value, param",
    [
        ("background", True, "background"),
        ("conversation", "conv_1", "conversation"),
        ("prompt", {"id": "pmpt_1"}, "prompt"),
        ("input", [{"type": "item_reference", "id": "x"}], "input[0].type"),
        ("tools", [{"type": "file_search"}], "tools[0].type"),
    ],
)
def test_responses_that_cannot_be_bounded(field, value, param):
    with pytest.raises(errors.GatewayError) as exc:
        METER.bound(route("responses"), {"model": "m", "input": "hi", field: value})
    assert exc.value.param == param


def test_messages_bound_counts_system_tool_use_and_results():
    body = {
        "model": "m",
        "max_tokens": 50,
        "system": [{"type": "text", "text": "sys"}],
        "messages": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "f", "input": {"a": 1}}]},
            {
                "role": "user",
                "content": [{"type": "tool_result", "tool_use_id": "t", "content": [{"type": "text", "text": "ok"}]}],
            },
        ],
    }
    bound = METER.bound(route("messages"), body)
    tool_use = body["messages"][1]["content"][0]
    result_rest = {"type": "tool_result", "tool_use_id": "t"}
    expected = 10 + 3 * 5 + 4 + 2 + 9 + rendered_len(tool_use) + 4 + (2 + 1) + rendered_len(result_rest) + 5 + (3 + 1)
    assert (bound.prompt, bound.cap) == (expected, 50)
    with pytest.raises(errors.GatewayError) as exc:
        METER.bound(route("messages"), {**body, "tools": [{"type": "web_search_20250305", "name": "s"}]})
    assert exc.value.param == "tools[0].type"


def test_rerank_and_score_count_every_pair():
    rerank = METER.bound(route("rerank"), {"query": "abc", "documents": ["de", {"text": "fgh"}]})
    assert (rerank.prompt, rerank.sequences) == ((3 + 2 + 2) + (3 + 3 + 2), 0)
    assert METER.bound(route("score"), {"text_1": "ab", "text_2": ["c", "de"]}).prompt == 2 * (2 + 2) + 3
    assert METER.bound(route("score"), {"text_1": ["ab", "c"], "text_2": ["d", "ef"]}).prompt == 3 + 3 + 4
    with pytest.raises(errors.GatewayError) as exc:
        METER.bound(route("score"), {"text_1": ["a", "b"], "text_2": ["c", "d", "e"]})
    assert exc.value.param == "text_2"


def test_requests_only_routes_reserve_nothing():
    assert METER.bound(route("tokenize"), {"model": "m", "prompt": "x" * 1000}).reserve == 0


def test_apply_cap_sets_every_cap_field_coherently():
    doc = {"max_completion_tokens": 0, "max_tokens": 1000, "min_tokens": 50}
    apply_cap(route("chat"), doc, 20)
    assert doc == {"max_completion_tokens": 20, "max_tokens": 20, "min_tokens": 20}
    doc = {}
    apply_cap(route("responses"), doc, 7)
    assert doc == {"max_output_tokens": 7}
    doc = {"prompt": "x"}
    apply_cap(route("completions"), doc, 9)
    assert doc == {"prompt": "x", "max_tokens": 9}


@pytest.mark.parametrize(
    "name, doc, cap, patch",
    [
        ("chat", {"model": "m", "max_tokens": 16}, 16, None),  # sent by the client: re-serialised
        ("chat", {"model": "m"}, 100, b',"max_completion_tokens":100,"max_tokens":100'),
        ("chat", {"model": "m", "max_tokens": 16, "max_completion_tokens": 16}, 16, None),
        ("chat", {"model": "m", "max_tokens": 1000, "max_completion_tokens": 0}, 1000, None),
        ("chat", {"model": "m", "max_tokens": 800}, 200, None),  # shrunk: the field changes
        ("chat", {"model": "m", "max_tokens": 16, "min_tokens": 20}, 16, None),
        ("completions", {"model": "m", "max_tokens": 5, "max_completion_tokens": 9}, 5, None),
        ("responses", {"model": "m"}, 7, b',"max_output_tokens":7'),
    ],
)
def test_cap_patch_appends_only_missing_fields(name, doc, cap, patch):
    raw = json.dumps(doc).encode() + b" \n"
    assert cap_patch(route(name), doc, cap, raw) == patch
    if patch is not None:  # appended to the client's bytes, it reads back as apply_cap's result
        patched = json.loads(raw.rstrip()[:-1] + patch + b"}")
        expected = dict(doc)
        apply_cap(route(name), expected, cap)
        assert patched == expected


@pytest.mark.parametrize(
    "raw",
    [
        b'{"model":"m","max_tokens":5000,"max_tokens":16}',  # duplicate: an upstream may read the first
        b'{"model":"m","max_tok\\u0065ns":5000,"max_tokens":16}',  # escaped duplicate
        b'{"model":"m","max_output_tokens":99}',  # a field the route does not read: appended to
    ],
)
def test_cap_patch_refuses_ambiguous_bodies(raw):
    doc = json.loads(raw)
    patch = cap_patch(route("chat"), doc, 16, raw)
    if b"max_output_tokens" in raw:
        assert patch == b',"max_completion_tokens":16,"max_tokens":16'
    else:
        assert patch is None  # re-serialised instead: one key, the cap
