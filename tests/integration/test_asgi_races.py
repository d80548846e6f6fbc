"""Settle-once and disconnect races, pinned in-process (tests/fixtures/asgi.py): the gateway's
ASGI callable driven directly, a real redis-server, a scripted upstream. Whatever ends an
admitted request (client gone mid-stream, client gone before the upstream answered, upstream
cut after its headers, upstream error, cancellation), it is settled exactly once, for what was
delivered, and leaves no lease (concurrency slot) or token reservation behind."""

from __future__ import annotations

import asyncio
from datetime import datetime, timezone

import pytest
import redis

from atlas_core import contract
from atlas_devstack.waiting import wait_for_async
from atlas_gateway.routes import route
from tests.fixtures.asgi import InProcessGateway, ScriptedUpstream
from tests.fixtures.gateway import write_key

KEY = "sk-races"
SUBJECT = contract.key_subject("team", "races")
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 50}
STREAM = {**CHAT, "stream": True}
USAGE = {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}


def chunk(text: str) -> dict:
    return {"id": "c1", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": text}}]}


@pytest.fixture
async def upstream():
    server = await ScriptedUpstream().start()
    yield server
    await server.stop()


@pytest.fixture
async def gateway(redis_url, upstream):
    # one slot: a leaked lease would refuse the next request (429)
    write_key(redis_url, KEY, "races", contract.Limits(max_concurrent=1, tokens_per_day=1_000_000))
    gw = await InProcessGateway(redis_url, upstream.url).start()
    yield gw
    await gw.stop()


def ledger(redis_url: str) -> dict[str, int]:
    client = redis.Redis.from_url(redis_url)
    try:
        day_key, _ = contract.usage_keys(SUBJECT, datetime.now(timezone.utc))
        return {
            "leases": client.zcard(contract.lease_key(SUBJECT)),
            "reserved": client.hlen(contract.lease_tokens_key(SUBJECT)),
            "settled": int(client.hget(day_key, contract.USAGE_SETTLED) or 0),
            "requests": int(client.hget(day_key, contract.USAGE_REQUESTS) or 0),
        }
    finally:
        client.close()


def prompt_bound(gw: InProcessGateway, body: dict) -> int:
    return gw.runtime.meter.bound(route("chat"), dict(body)).prompt


async def assert_slot_free(gw: InProcessGateway, upstream: ScriptedUpstream) -> None:
    """The key's only concurrency slot is free again: a new request is admitted and answered."""

    async def answer(request):
        await request.json_response(200, {"id": "c2", "choices": [], "usage": USAGE})

    upstream.script = answer
    follow_up = gw.request("/v1/chat/completions", CHAT, KEY)
    await follow_up.done()
    assert follow_up.status == 200, follow_up.body_bytes


async def test_a_normal_request_settles_once_to_the_upstreams_usage(gateway, upstream, redis_url):
    async def answer(request):
        assert request.json["max_tokens"] == 50
        await request.json_response(200, {"id": "c1", "choices": [], "usage": USAGE})

    upstream.script = answer
    ex = gateway.request("/v1/chat/completions", CHAT, KEY)
    await ex.done()
    assert ex.status == 200
    rid = ex.headers[b"x-request-id"].decode()
    assert gateway.settlements == {rid: 1}
    assert ledger(redis_url) == {"leases": 0, "reserved": 0, "settled": 12, "requests": 1}


async def test_client_gone_mid_stream_is_billed_for_what_was_delivered_once(gateway, upstream, redis_url):
    release = asyncio.Event()  # never set while the client is there: the upstream keeps the stream open

    async def stream(request):
        assert request.json["stream_options"] == {"include_usage": True}
        await request.start_sse()
        for text in ("a", "b", "c"):
            await request.sse(chunk(text))
        await release.wait()

    upstream.script = stream
    ex = gateway.request("/v1/chat/completions", STREAM, KEY)
    await wait_for_async("three events delivered", lambda: len(ex.data_events()) == 3, 5.0, interval=0.002)
    ex.disconnect()
    await ex.done()
    rid = ex.headers[b"x-request-id"].decode()
    assert gateway.settlements == {rid: 1}
    # the gateway hung up on the upstream: it never reads (or pays for) the rest
    await asyncio.wait_for(upstream.requests[0].closed.wait(), 5)
    assert ledger(redis_url) == {
        "leases": 0,
        "reserved": 0,
        "settled": prompt_bound(gateway, STREAM) + 3,
        "requests": 1,
    }
    await assert_slot_free(gateway, upstream)


@pytest.mark.parametrize("body", [CHAT, STREAM], ids=["non-streaming", "streaming"])
async def test_client_gone_right_after_admission_is_billed_the_prefill_once(gateway, upstream, redis_url, body):
    """The client leaves while the upstream has not answered yet: the request is aborted
    upstream (a non-streaming one once it has waited WATCH_AFTER) and billed its prompt."""

    async def never_answers(request):
        await request.closed.wait()

    upstream.script = never_answers
    ex = gateway.request("/v1/chat/completions", body, KEY)
    await wait_for_async("the upstream call", lambda: upstream.requests, 5.0, interval=0.002)
    ex.disconnect()
    await ex.done()
    assert ex.status is None  # nothing reached the client (it was gone)
    assert len(gateway.settlements) == 1 and set(gateway.settlements.values()) == {1}
    await asyncio.wait_for(upstream.requests[0].closed.wait(), 5)
    assert ledger(redis_url) == {"leases": 0, "reserved": 0, "settled": prompt_bound(gateway, body), "requests": 1}
    await assert_slot_free(gateway, upstream)


async def test_upstream_cut_after_its_headers_ends_the_stream_with_an_error_and_settles_once(
    gateway, upstream, redis_url
):
    async def crashes(request):
        await request.start_sse()
        await request.sse(chunk("a"))
        await request.sse(chunk("b"))
        request.cut()

    upstream.script = crashes
    ex = gateway.request("/v1/chat/completions", STREAM, KEY)
    await ex.done()
    assert ex.status == 200 and ex.finished.is_set()
    events = ex.data_events()
    assert len(events) == 3 and b"upstream_disconnected" in events[-1], events
    rid = ex.headers[b"x-request-id"].decode()
    assert gateway.settlements == {rid: 1}
    assert ledger(redis_url) == {
        "leases": 0,
        "reserved": 0,
        "settled": prompt_bound(gateway, STREAM) + 2,
        "requests": 1,
    }
    await assert_slot_free(gateway, upstream)


async def test_upstream_error_reply_is_passed_on_and_settles_nothing_once(gateway, upstream, redis_url):
    async def refuses(request):
        await request.json_response(500, {"error": {"message": "boom"}})

    upstream.script = refuses
    ex = gateway.request("/v1/chat/completions", STREAM, KEY)
    await ex.done()
    assert ex.status == 500 and b"boom" in ex.body_bytes
    assert sum(gateway.settlements.values()) == 1
    assert ledger(redis_url) == {"leases": 0, "reserved": 0, "settled": 0, "requests": 1}
    await assert_slot_free(gateway, upstream)


async def test_upstream_unreachable_after_admission_is_a_502_that_settles_once(redis_url):
    write_key(redis_url, KEY, "races", contract.Limits(max_concurrent=1, tokens_per_day=1_000_000))
    closed = await ScriptedUpstream().start()
    url = closed.url
    await closed.stop()  # nothing listens there any more
    gw = await InProcessGateway(redis_url, url).start()
    try:
        for _ in range(2):  # the second proves the first left its slot free
            ex = gw.request("/v1/chat/completions", CHAT, KEY)
            await ex.done()
            assert ex.status == 502, ex.body_bytes
        assert sorted(gw.settlements.values()) == [1, 1]
        assert ledger(redis_url) == {"leases": 0, "reserved": 0, "settled": 0, "requests": 2}
    finally:
        await gw.stop()


async def test_a_cancelled_handler_still_settles_once(gateway, upstream, redis_url):
    """Server shutdown cancels the handler task while the upstream thinks: the cancellation goes
    on (the server wants it), the reservation does not stay behind."""

    async def never_answers(request):
        await request.closed.wait()

    upstream.script = never_answers
    ex = gateway.request("/v1/chat/completions", STREAM, KEY)
    await wait_for_async("the upstream call", lambda: upstream.requests, 5.0, interval=0.002)
    ex.task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await ex.task
    assert sum(gateway.settlements.values()) == 1
    # the settlement was queued before the cancellation finished the task: wait for Redis to run it
    await wait_for_async("the lease released", lambda: ledger(redis_url)["leases"] == 0, 5.0, interval=0.002)
    assert ledger(redis_url) == {"leases": 0, "reserved": 0, "settled": prompt_bound(gateway, STREAM), "requests": 1}
    await assert_slot_free(gateway, upstream)


async def test_an_unknown_key_reaches_neither_redis_admission_nor_the_upstream(gateway, upstream, redis_url):
    ex = gateway.request("/v1/chat/completions", CHAT, "sk-unknown")
    await ex.done()
    assert ex.status == 401 and not upstream.requests and not gateway.settlements
    assert ledger(redis_url)["requests"] == 0
