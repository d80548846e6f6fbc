"""A stream that outlives ATLAS_LEASE_TTL_SECONDS keeps its concurrency slot: the gateway
refreshes the lease while the request is upstream (every TTL/3), so the purge of expired
leases in admit.lua never frees the slot of a live stream."""

from __future__ import annotations

import httpx
import redis

from atlas_core import contract
from atlas_devstack.waiting import wait_for
from tests.fixtures.gateway import write_key

LEASE_TTL_MS = 600


def test_long_stream_keeps_its_slot_past_the_lease_ttl(redis_url, mock_upstream, start_gateway):
    write_key(redis_url, "sk-long", "long", contract.Limits(max_concurrent=1))
    gw = start_gateway(redis_url, mock_upstream.url, ATLAS_LEASE_TTL_SECONDS=str(LEASE_TTL_MS / 1000))
    client = redis.Redis.from_url(redis_url)
    lease = contract.lease_key(contract.key_subject("team", "long"))
    auth = {"Authorization": "Bearer sk-long"}
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 200, "stream": True}
    # 200 events, 40 ms apart: about 8 s, many lease TTLs
    stream_headers = {**auth, "x-mock-completion-tokens": "200", "x-mock-chunk-delay-ms": "40"}
    try:
        with httpx.stream(
            "POST", gw.url + "/v1/chat/completions", json=body, headers=stream_headers, timeout=30
        ) as stream:
            assert stream.status_code == 200
            events = stream.iter_lines()
            assert next(events).startswith("data:")
            members = client.zrange(lease, 0, -1, withscores=True)
            assert len(members) == 1
            first_expiry = members[0][1]

            def refreshed_past_first_expiry() -> bool:
                # Redis's own clock has passed the first expiry, and the lease is still there
                now_ms = int(client.time()[0]) * 1000
                score = client.zscore(lease, members[0][0])
                return score is not None and now_ms > first_expiry + 200 and score > now_ms

            wait_for("lease refreshed past its first expiry", refreshed_past_first_expiry, 5)
            # without the refresh admit.lua would purge the expired lease and admit this one
            second = httpx.post(
                gw.url + "/v1/chat/completions",
                headers=auth,
                timeout=10,
                json={**body, "stream": False, "max_tokens": 1},
            )
            assert second.status_code == 429, second.text
            assert second.json()["error"]["code"] == "rate_limit_exceeded"
            lines = [line for line in events if line]
            assert lines[-1] == "data: [DONE]"  # the stream was still running and ended normally
        wait_for("lease released after the stream", lambda: client.zcard(lease) == 0, 5)
        third = httpx.post(
            gw.url + "/v1/chat/completions", headers=auth, timeout=10, json={**body, "stream": False, "max_tokens": 1}
        )
        assert third.status_code == 200
    finally:
        client.close()
