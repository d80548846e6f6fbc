"""Hostile and careless clients against a real gateway process (issue 10, cases 4-7): deep JSON,
work before authentication (bodies of unknown keys, slow uploads, idle sockets, huge headers,
too many connections), shedding that fits the upstream pool, and the forwarded priority.

Slow clients are raw sockets: they send what a hostile client sends, byte by byte if need be.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from datetime import datetime, timezone

import httpx
import pytest
import redis

from atlas_core import contract
from atlas_devstack.waiting import wait_for
from tests.fixtures.gateway import write_key

MODEL = "llama-3.1-8b-instruct"
BODY = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}


def connect(gw) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", gw.port), timeout=10)
    return sock


def request_head(key: str, length: int, path: str = "/v1/chat/completions") -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {key}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {length}\r\n\r\n"
    ).encode()


def read_response(sock: socket.socket, timeout: float = 10) -> tuple[int, bytes]:
    """(status, everything the server sent until it closed the connection or timeout)."""
    sock.settimeout(timeout)
    data = b""
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
            if b"\r\n\r\n" in data:
                head, _, rest = data.partition(b"\r\n\r\n")
                length = next(
                    (
                        int(line.split(b":")[1])
                        for line in head.split(b"\r\n")
                        if line.lower().startswith(b"content-length:")
                    ),
                    None,
                )
                if length is not None and len(rest) >= length:
                    break
    except socket.timeout:
        pass
    status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.1 ") else 0
    return status, data


def closed_by_server(sock: socket.socket) -> bool:
    """True once the server closed the connection (EOF or reset), without blocking."""
    sock.setblocking(False)
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return True
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True


def requests_today(r: redis.Redis, name: str) -> int:
    day_key, _ = contract.usage_keys(contract.key_subject("team", name), datetime.now(timezone.utc))
    return int(r.hget(day_key, "requests") or 0)


@pytest.fixture
def key(redis_url):
    write_key(redis_url, "sk-hostile", "hostile", contract.Limits(max_concurrent=50, tokens_per_day=1_000_000))
    return "sk-hostile"


# --------------------------------------------------------------------------- 4. deep JSON


def test_deeply_nested_json_is_a_400_without_a_traceback(redis_url, mock_upstream, start_gateway, key):
    gw = start_gateway(redis_url, mock_upstream.url)
    log_before = len(gw.log())
    for depth in (65, 900, 5000):
        nested = "[" * depth + "]" * depth
        body = '{"model": "%s", "messages": [{"role": "user", "content": %s}]}' % (MODEL, nested)
        resp = httpx.post(
            gw.url + "/v1/chat/completions",
            content=body,
            timeout=10,
            headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
        )
        assert resp.status_code == 400, (depth, resp.status_code, resp.text[:200])
        assert resp.json()["error"]["type"] == "invalid_request_error"
    shallow = {
        **BODY,
        "tools": [
            {
                "type": "function",
                "function": {
                    "name": "f",
                    "parameters": {
                        "type": "object",
                        "properties": {"a": {"type": "array", "items": {"type": "object"}}},
                    },
                },
            }
        ],
    }
    assert (
        httpx.post(
            gw.url + "/v1/chat/completions", json=shallow, timeout=10, headers={"Authorization": f"Bearer {key}"}
        ).status_code
        == 200
    )
    assert len(gw.log()) - log_before < 2000, "per-request tracebacks in the log"


# ------------------------------------------------------------ 5. work before authentication


def test_unknown_key_gets_401_without_its_body_being_read(redis_url, mock_upstream, start_gateway, key):
    """Headers announce 4 MB; the body never comes. The key is checked first: 401 at once, and
    the connection is let go rather than held open for the body."""
    gw = start_gateway(redis_url, mock_upstream.url)
    sock = connect(gw)
    sock.sendall(request_head("sk-not-a-key", 4 * 1024 * 1024) + b"{")
    started = time.monotonic()
    status, data = read_response(sock, timeout=5)
    assert status == 401, data[:300]
    assert time.monotonic() - started < 2
    wait_for("the gateway to let go of the connection", lambda: closed_by_server(sock), 5)
    sock.close()


def test_slow_body_gets_408_and_consumes_nothing(redis_url, redis_client, mock_upstream, start_gateway, key):
    """A known key sends its body at a few bytes per second: 408 after ATLAS_BODY_TIMEOUT_SECONDS,
    no admission (no request counted, no lease)."""
    gw = start_gateway(redis_url, mock_upstream.url, ATLAS_BODY_TIMEOUT_SECONDS="1")
    body = json.dumps(BODY).encode()
    sock = connect(gw)
    sock.sendall(request_head(key, len(body)))
    started = time.monotonic()
    sock.settimeout(0.2)
    status, data = 0, b""
    for byte in body:  # a byte every 0.2 s until the gateway answers
        try:
            sock.sendall(bytes([byte]))
            data += sock.recv(65536)
        except socket.timeout:
            continue
        except (BrokenPipeError, ConnectionResetError):
            break
        if data:
            break
    if not data:
        status, data = read_response(sock, timeout=5)
    status = int(data.split(b" ", 2)[1])
    assert status == 408, data[:300]
    assert 0.9 < time.monotonic() - started < 5
    assert b"request_timeout" in data
    wait_for("connection closed after the 408", lambda: closed_by_server(sock), 5)
    sock.close()
    assert requests_today(redis_client, "hostile") == 0
    assert redis_client.zcard(contract.lease_key(contract.key_subject("team", "hostile"))) == 0


def test_idle_and_slow_header_connections_are_closed(redis_url, mock_upstream, start_gateway):
    """Sockets that send nothing, or headers a byte at a time, are closed after
    ATLAS_HEADER_TIMEOUT_SECONDS (a request cut short gets a 408)."""
    gw = start_gateway(redis_url, mock_upstream.url, ATLAS_HEADER_TIMEOUT_SECONDS="1")
    idle = [connect(gw) for _ in range(50)]
    trickling = connect(gw)
    trickling.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: g")
    wait_for("idle sockets closed", lambda: all(closed_by_server(s) for s in idle), 5)
    status, data = read_response(trickling, timeout=5)
    assert status == 408, data[:200]
    for sock in idle + [trickling]:
        sock.close()
    assert httpx.get(gw.url + "/healthz").status_code == 200


def test_oversized_headers_get_431_and_are_not_buffered(redis_url, mock_upstream, start_gateway):
    gw = start_gateway(redis_url, mock_upstream.url, ATLAS_MAX_HEADER_BYTES="16384")
    sock = connect(gw)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: g\r\nX-Big: ")
    status, data = 0, b""
    sock.settimeout(0.5)
    sent = 0
    try:
        while sent < 20 * 1024 * 1024:  # keep sending one endless header, as the hostile client did
            sock.sendall(b"a" * 65536)
            sent += 65536
    except (BrokenPipeError, ConnectionResetError, socket.timeout):
        pass
    status, data = read_response(sock, timeout=5)
    assert status in (431, 0), data[:200]
    assert sent < 4 * 1024 * 1024, f"the gateway accepted {sent} bytes of one header"
    sock.close()
    assert httpx.get(gw.url + "/healthz").status_code == 200


def test_open_connections_are_capped_per_process(redis_url, mock_upstream, start_gateway, key):
    gw = start_gateway(redis_url, mock_upstream.url, ATLAS_MAX_CONNECTIONS="20")
    held = [connect(gw) for _ in range(20)]
    extra = connect(gw)
    status, data = read_response(extra, timeout=5)
    assert status == 503 and b"too_many_connections" in data, data[:200]
    extra.close()
    for sock in held:
        sock.close()
    wait_for(
        "service once the held connections are gone",
        lambda: (
            httpx.post(
                gw.url + "/v1/chat/completions", json=BODY, timeout=5, headers={"Authorization": f"Bearer {key}"}
            ).status_code
            == 200
        ),
        5,
    )


# ------------------------------------------------------------------------ 6. shedding


def test_critical_requests_are_shed_at_the_pool_size_not_timed_out(redis_url, mock_upstream, start_gateway):
    """Pool of 4, upstream answers in 1.5 s, connect timeout 0.5 s. Six Critical requests at once:
    four go through, two are shed with 503 + Retry-After; none waits for a pooled connection
    into a 504 from a healthy upstream."""
    write_key(redis_url, "sk-critical", "critical", contract.Limits(max_concurrent=100), priority="Critical")
    gw = start_gateway(redis_url, mock_upstream.url, ATLAS_UPSTREAM_POOL_SIZE="4", ATLAS_UPSTREAM_CONNECT_TIMEOUT="0.5")

    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=10) as client:

            async def one() -> httpx.Response:
                return await client.post(
                    gw.url + "/v1/chat/completions",
                    json=BODY,
                    headers={"Authorization": "Bearer sk-critical", "x-mock-latency-ms": "1500"},
                )

            return list(await asyncio.gather(*(one() for _ in range(6))))

    responses = asyncio.run(run())
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200, 200, 200, 200, 503, 503], statuses
    shed = [r for r in responses if r.status_code == 503]
    assert all(r.headers.get("retry-after") and r.json()["error"]["code"] == "overloaded" for r in shed)


# --------------------------------------------------------------------- 7. forwarded priority


@pytest.mark.parametrize(
    "route,body",
    [
        ("/v1/embeddings", {"model": "text-embedding-3-small", "input": "hello"}),
        ("/v1/chat/completions", BODY),
        ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 5}),
    ],
)
def test_forwarded_priority_is_always_atlas_s(redis_url, mock_upstream, start_gateway, route, body):
    write_key(redis_url, "sk-batch", "batch", contract.Limits(), priority="Sheddable")
    gw = start_gateway(redis_url, mock_upstream.url, ATLAS_FORWARD_PRIORITY="true")
    plain = start_gateway(redis_url, mock_upstream.url)  # ATLAS_FORWARD_PRIORITY off
    for gateway, expected in ((gw, 2), (plain, None)):
        mock_id = f"prio-{route.rsplit('/', 1)[1]}-{gateway.port}"
        resp = httpx.post(
            gateway.url + route,
            json={**body, "priority": -1000},
            timeout=10,
            headers={"Authorization": "Bearer sk-batch", "x-mock-id": mock_id},
        )
        assert resp.status_code == 200, resp.text
        seen = httpx.get(f"{mock_upstream.url}/_mock/requests/{mock_id}").json()["body"]
        assert seen.get("priority") == expected, (route, seen)
