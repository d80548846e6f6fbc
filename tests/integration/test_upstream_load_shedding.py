"""Shedding by the upstream's own load (issue 19): a real gateway process in front of the mock
upstream, which exports vllm:num_requests_running / _waiting from its real state.

* An upstream whose queue reaches the Sheddable threshold: Sheddable requests get 503 +
  Retry-After, Standard and Critical ones pass (and are served once the queue drains).
* An idle upstream and 2,000 long requests held at once from one client process, against the
  gateway's defaults: not one is shed, even Sheddable ones (before issue 19 the defaults shed
  Sheddable requests past 256 in flight); the same in front of an upstream that exports nothing
  (the in-flight ceilings decide), whose unreadable load is logged once.
"""

from __future__ import annotations

import asyncio
import json
import re

import httpx
import pytest

from atlas_core import contract
from atlas_devstack.mock_upstream import MockUpstreamProcess
from atlas_devstack.waiting import wait_for_async
from tests.fixtures.gateway import write_key

MODEL = "llama-3.1-8b-instruct"
KEY = "sk-upstream-load"
BODY = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
HELD = 2_000


def gauge(page: str, name: str, **labels: str) -> float | None:
    """One sample of a Prometheus text page, or None."""
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in page.splitlines():
        if line.startswith(name + ("{" if labels else " ")) and (not labels or want in line):
            return float(line.rsplit(" ", 1)[1])
    return None


def request_bytes(priority: str, extra: str = "") -> bytes:
    body = json.dumps(BODY).encode()
    return (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {KEY}\r\n"
        f"x-atlas-priority: {priority}\r\n{extra}Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


async def hold(port: int, n: int, priority: str) -> list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """n requests the mock never answers (``x-mock-fail: hang``) until their client leaves."""
    conns = []
    for _ in range(n):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(request_bytes(priority, "x-mock-fail: hang\r\n"))
        conns.append((reader, writer))
    return conns


def release(conns) -> None:
    for _, writer in conns:
        writer.close()


@pytest.fixture
def queued_upstream():
    with MockUpstreamProcess(capacity=2) as mock:
        yield mock


def test_sheddable_is_shed_when_the_upstream_queue_passes_its_threshold(redis_url, queued_upstream, start_gateway):
    write_key(redis_url, KEY, "upstream-load", contract.Limits(), priority="Critical")
    gw = start_gateway(
        redis_url,
        queued_upstream.url,
        ATLAS_UPSTREAM_LOAD_SECONDS="0.1",
        ATLAS_SHED_QUEUE_THRESHOLD="3",
        ATLAS_SHED_QUEUE_THRESHOLD_STANDARD="10",
        ATLAS_SHED_QUEUE_THRESHOLD_CRITICAL="20",
    )

    async def scenario() -> None:
        async with httpx.AsyncClient(timeout=60) as client:

            async def call(priority: str) -> httpx.Response:
                return await client.post(
                    gw.url + "/v1/chat/completions",
                    json=BODY,
                    headers={"Authorization": f"Bearer {KEY}", "x-atlas-priority": priority},
                )

            async def gateway_sees(waiting: int) -> bool:
                page = (await client.get(gw.url + "/metrics")).text
                return gauge(page, "atlas_gateway_upstream_load_requests", state="waiting") == waiting

            assert (await call("Sheddable")).status_code == 200  # an empty queue sheds nothing
            conns = await hold(gw.port, 2 + 3, "Critical")  # 2 running (the mock's capacity), 3 waiting
            try:
                await wait_for_async("the gateway to read a queue of 3", lambda: gateway_sees(3), 15)
                shed = await call("Sheddable")
                assert shed.status_code == 503 and shed.headers["retry-after"] == "1"
                assert shed.json()["error"]["code"] == "overloaded"
                # Standard and Critical pass the shedding: they join the upstream's queue
                passing = [asyncio.ensure_future(call(p)) for p in ("Standard", "Critical")]
                await wait_for_async("both queued upstream", lambda: gateway_sees(5), 15)
            finally:
                release(conns)  # the held requests leave: the queue drains
            assert [r.status_code for r in await asyncio.gather(*passing)] == [200, 200]
            await wait_for_async("the queue to drain", lambda: gateway_sees(0), 15)
            assert (await call("Sheddable")).status_code == 200

    asyncio.run(scenario())


@pytest.mark.parametrize("exports_load", [True, False], ids=["idle-upstream", "upstream-exporting-nothing"])
def test_an_idle_upstream_with_2000_long_requests_sheds_none(redis_url, start_gateway, exports_load):
    write_key(redis_url, KEY, "upstream-load", contract.Limits(), priority="Critical")
    with MockUpstreamProcess(metrics=exports_load) as mock:
        gw = start_gateway(redis_url, mock.url)  # the gateway's defaults

        async def scenario() -> None:
            async with httpx.AsyncClient(timeout=60) as client:

                async def metric(name: str, **labels: str) -> float | None:
                    return gauge((await client.get(gw.url + "/metrics")).text, name, **labels)

                async def mock_running() -> float | None:
                    if not exports_load:
                        return None
                    return gauge(
                        (await client.get(mock.url + "/metrics")).text, "vllm:num_requests_running", model_name=MODEL
                    )

                # Sheddable: the first class shed, were anything shed
                conns = await hold(gw.port, HELD, "Sheddable")
                try:
                    await wait_for_async(f"{HELD} requests in flight upstream", lambda: _inflight(client, gw.url), 60)
                    answered = [reader for reader, _ in conns if reader.at_eof() or len(reader._buffer)]
                    assert answered == []  # no 503 (nor anything else) came back
                    if exports_load:
                        assert await mock_running() == HELD
                        assert await metric("atlas_gateway_upstream_load_fresh", upstream=mock.url) == 1
                    else:
                        assert await metric("atlas_gateway_upstream_load_fresh", upstream=mock.url) == 0
                    shed = await metric("atlas_gateway_rejections_total", key="team/upstream-load", reason="overloaded")
                    assert not shed
                finally:
                    release(conns)

        asyncio.run(scenario())
        if not exports_load:
            log = gw.log_path.read_text()
            assert len(re.findall("its load cannot be read", log)) == 1, log[-2000:]


async def _inflight(client: httpx.AsyncClient, url: str) -> bool:
    return gauge((await client.get(url + "/metrics")).text, "atlas_gateway_inflight_requests") == HELD
