"""The metering invariant, table-driven: what the upstream counts for admitted requests never
exceeds a budget, whatever the request looks like.

Every request shape x {no stream, stream} x {key tokensPerDay, quota tokensPerDay, key
tokensPerMinute}: 200 concurrent requests through one real gateway process and a real
redis-server to the strict upstream (devstack/atlas_devstack/strict_upstream.py), which
counts the way vLLM does and at least as finely as a BPE. Per case it asserts that

* what the upstream counted for the admitted requests stays within the budget (for tokens per
  minute: the budget plus what the bucket refilled while the case ran);
* the requests that fit were admitted (at least budget // reservation of them), the others got
  a 429, and nothing else happened;
* the gateway's books (settled tokens in Redis) equal the upstream's count.

A fourth budget, the quota's tokensPerDay with ``onBudgetShortfall: Shrink``, shows the same
for requests whose cap the gateway lowered at the end of the budget.

Set ATLAS_METERING_TABLE=<path> to have the table (shape, admitted, counted, budget) written.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from dataclasses import dataclass, field

import aiohttp
import pytest
import redis

from atlas_core import contract
from atlas_gateway.metering.bounds import Meter
from atlas_gateway.routes import route
from atlas_gateway.settings import Settings
from tests.fixtures.gateway import write_key

CONCURRENCY = 200
FITS = 10  # each budget holds this many full reservations (and a half)
MODEL = "strict-model"
ROWS: list[dict] = []

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "lookup",
            "description": "Look a term up.",
            "parameters": {
                "type": "object",
                "properties": {
                    "term": {"type": "string", "description": "what to look up"},
                    "limit": {"type": "integer"},
                },
                "required": ["term"],
            },
        },
    }
]
TOOL_CALLS = [
    {
        "id": "call_1",
        "type": "function",
        "function": {"name": "lookup", "arguments": json.dumps({"term": "atlas", "limit": 3})},
    }
]
IMAGE = {"type": "image_url", "image_url": {"url": "https://example.invalid/cat.png"}}


@dataclass(frozen=True)
class Shape:
    name: str
    route: str  # the route table's name of the route
    path: str
    body: dict = field(hash=False)
    streams: bool = True


def user(content) -> dict:
    return {"role": "user", "content": content}


SHAPES = [
    Shape("chat, no max_tokens", "chat", "/v1/chat/completions", {"messages": [user("Tell me everything.")]}),
    Shape(
        "chat, max_completion_tokens 0 + max_tokens 1000",
        "chat",
        "/v1/chat/completions",
        {"messages": [user("hi")], "max_completion_tokens": 0, "max_tokens": 1000},
    ),
    Shape("chat, n=3", "chat", "/v1/chat/completions", {"messages": [user("three ways")], "n": 3, "max_tokens": 64}),
    Shape(
        "chat, tools + tool calls + results",
        "chat",
        "/v1/chat/completions",
        {
            "tools": TOOLS,
            "max_tokens": 32,
            "messages": [
                {"role": "system", "content": "You look things up."},
                user("What is atlas?"),
                {"role": "assistant", "content": None, "tool_calls": TOOL_CALLS},
                {"role": "tool", "tool_call_id": "call_1", "content": "Atlas is a gateway."},
            ],
        },
    ),
    Shape(
        "chat, media parts",
        "chat",
        "/v1/chat/completions",
        {"max_tokens": 16, "messages": [user([{"type": "text", "text": "Compare these."}, IMAGE, IMAGE])]},
    ),
    Shape(
        "chat, short words ('a a a ...')",
        "chat",
        "/v1/chat/completions",
        {"messages": [user("a " * 3000)], "max_tokens": 8},
    ),
    Shape(
        "chat, per-frame cumulative usage",
        "chat",
        "/v1/chat/completions",
        {
            "messages": [user("count")],
            "max_tokens": 40,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True},
        },
    ),
    Shape(
        "completions, batch of 100 prompts",
        "completions",
        "/v1/completions",
        {"prompt": ["Once upon a time"] * 100, "max_tokens": 20},
    ),
    Shape(
        "completions, token-id batch, best_of 3",
        "completions",
        "/v1/completions",
        {"prompt": [[101, 102, 103] * 20, [7] * 9], "n": 2, "best_of": 3, "max_tokens": 10},
    ),
    Shape(
        "embeddings, batch of 50 inputs",
        "embeddings",
        "/v1/embeddings",
        {"input": ["the quick brown fox"] * 50},
        streams=False,
    ),
    Shape(
        "responses, items, no max_output_tokens",
        "responses",
        "/v1/responses",
        {
            "instructions": "Be brief.",
            "tools": TOOLS,
            "input": [
                {"role": "user", "content": [{"type": "input_text", "text": "look it up"}]},
                {"type": "function_call", "call_id": "c1", "name": "lookup", "arguments": '{"term": "x"}'},
                {"type": "function_call_output", "call_id": "c1", "output": "found x"},
            ],
        },
    ),
    Shape(
        "messages, system + tool_use/tool_result",
        "messages",
        "/v1/messages",
        {
            "max_tokens": 40,
            "system": "You are terse.",
            "messages": [
                user("look up atlas"),
                {
                    "role": "assistant",
                    "content": [{"type": "tool_use", "id": "t1", "name": "lookup", "input": {"term": "atlas"}}],
                },
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "a gateway"}]},
            ],
        },
    ),
    Shape(
        "rerank, 20 documents",
        "rerank",
        "/v1/rerank",
        {"query": "what is a gateway", "documents": [f"document number {i}" for i in range(20)]},
        streams=False,
    ),
    Shape(
        "score, 1 x 10",
        "score",
        "/v1/score",
        {"text_1": "a query", "text_2": [f"candidate {i}" for i in range(10)]},
        streams=False,
    ),
]

BUDGETS = ("key tokensPerDay", "quota tokensPerDay", "key tokensPerMinute", "quota tokensPerDay, Shrink")

CASES = [
    (shape, stream, budget)
    for shape in SHAPES
    for stream in ((False, True) if shape.streams else (False,))
    for budget in BUDGETS
]


def case_id(case) -> str:
    shape, stream, budget = case
    return f"{shape.name} | {'stream' if stream else 'no stream'} | {budget}"


@pytest.fixture(scope="module")
def gateway(redis_server, strict_upstream, tmp_path_factory):
    from tests.fixtures.gateway import GatewayProcess

    gw = GatewayProcess(
        redis_server.url, strict_upstream.url, tmp_path_factory.mktemp("metering"), ATLAS_LOG_LEVEL="warning"
    ).start()
    yield gw
    gw.stop()
    table = os.environ.get("ATLAS_METERING_TABLE")
    if table and ROWS:
        with open(table, "w") as out:
            json.dump(ROWS, out, indent=1)


@pytest.fixture(scope="module")
def meter() -> Meter:
    return Meter.from_settings(Settings(upstream_url="http://unused"))  # the gateway's defaults


async def fire(url: str, api_key: str, ledger: str, body: dict) -> list[tuple[int, bytes, dict]]:
    headers = {"Authorization": f"Bearer {api_key}", "x-strict-ledger": ledger}
    connector = aiohttp.TCPConnector(limit=CONCURRENCY)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as session:

        async def one():
            async with session.post(url, json=body, headers=headers) as resp:
                return resp.status, await resp.read(), dict(resp.headers)

        return await asyncio.gather(*(one() for _ in range(CONCURRENCY)))


def ledger_of(upstream_url: str, name: str) -> dict:
    import urllib.request

    with urllib.request.urlopen(f"{upstream_url}/_strict/ledger/{name}", timeout=5) as resp:
        return json.loads(resp.read())


@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
async def test_upstream_count_never_exceeds_the_budget(case, gateway, strict_upstream, redis_server, meter):
    shape, stream, budget_kind = case
    body = {"model": MODEL, **shape.body}
    if stream:
        body["stream"] = True
    reserve = meter.bound(route(shape.route), json.loads(json.dumps(body))).reserve
    budget = FITS * reserve + reserve // 2
    index = CASES.index(case)
    name, api_key = f"case-{index}", f"sk-atlas-metering-{index:04d}-{os.getpid()}"
    if budget_kind == "key tokensPerDay":
        write_key(redis_server.url, api_key, name, contract.Limits(tokens_per_day=budget))
        subject = contract.key_subject("team", name)
    elif budget_kind.startswith("quota tokensPerDay"):
        write_key(
            redis_server.url,
            api_key,
            name,
            contract.Limits(),
            quota=f"q-{index}",
            quota_limits=contract.Limits(tokens_per_day=budget),
        )
        subject = contract.quota_subject("team", f"q-{index}")
        if budget_kind.endswith("Shrink"):
            client = redis.Redis.from_url(redis_server.url)
            try:  # as the operator writes an AtlasQuota with onBudgetShortfall: Shrink
                client.set(
                    contract.quota_config_key("team", f"q-{index}"),
                    contract.QuotaConfig(
                        "team", f"q-{index}", contract.Limits(tokens_per_day=budget), contract.Shortfall("Shrink", 16)
                    ).encode(),
                )
            finally:
                client.close()
    else:
        write_key(redis_server.url, api_key, name, contract.Limits(tokens_per_minute=budget))
        subject = contract.key_subject("team", name)

    started = time.monotonic()
    replies = await fire(gateway.url + shape.path, api_key, name, body)
    elapsed = time.monotonic() - started
    statuses = [status for status, _, _ in replies]
    unexpected = [(s, b[:300]) for s, b, _ in replies if s not in (200, 429)]
    assert not unexpected, unexpected
    admitted = statuses.count(200)
    counted = ledger_of(strict_upstream.url, name)
    allowed = budget if budget_kind != "key tokensPerMinute" else budget + int(budget * (elapsed + 1) / 60)
    shrunk = sum(
        1
        for s, _, h in replies
        if s == 200
        and "x-atlas-max-tokens" in h
        and int(h["x-atlas-max-tokens"]) < meter.bound(route(shape.route), json.loads(json.dumps(body))).cap
    )
    ROWS.append(
        {
            "shape": shape.name,
            "stream": stream,
            "budget_kind": budget_kind,
            "reservation": reserve,
            "admitted": admitted,
            "shrunk": shrunk,
            "refused": statuses.count(429),
            "counted": counted["tokens"],
            "budget": budget,
            "seconds": round(elapsed, 2),
        }
    )

    assert counted["requests"] == admitted  # every admitted request reached the upstream, no refused one did
    assert counted["tokens"] <= allowed, f"upstream counted {counted['tokens']} on a budget of {budget}"
    assert admitted >= min(CONCURRENCY, budget // reserve), f"only {admitted} admitted, {budget // reserve} fit"
    if not budget_kind.endswith("Shrink"):
        assert shrunk == 0
    if stream and shape.route in ("chat", "completions"):
        assert all(b.rstrip().endswith(b"data: [DONE]") for s, b, _ in replies if s == 200)
    client = redis.Redis.from_url(redis_server.url)
    try:
        day_key, _ = contract.usage_keys(subject, contract_now())
        settled = int(client.hget(day_key, "settled") or 0)
    finally:
        client.close()
    assert settled == counted["tokens"]  # the gateway billed exactly what the upstream counted


def contract_now():
    from datetime import datetime, timezone

    return datetime.now(timezone.utc)
