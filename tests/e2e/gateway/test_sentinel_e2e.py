"""E2E with Redis Sentinel: the official openai SDK through a gateway that knows only the
``redis+sentinel://`` URL; the master is killed (SIGKILL) and a replica promoted. The SDK's
calls fail with a 503 while no master is known, then succeed; the key's usage (``/v1/usage``,
read from the new master) counts every answered request, before and after."""

from __future__ import annotations

import httpx
import openai
import pytest

from atlas_core import contract
from atlas_devstack.redis_sentinel import SentinelGroup
from atlas_devstack.waiting import wait_for
from tests.fixtures.gateway import GatewayProcess

MODEL = "llama-3.1-8b-instruct"
API_KEY = "sk-atlas-sentinel-e2e"


@pytest.fixture
def group():
    with SentinelGroup(replicas=1, sentinels=3, password="pw") as g:
        yield g


def test_openai_sdk_through_a_sentinel_failover(group, mock_upstream, tmp_path):
    import redis

    with redis.Redis(port=group.master.port, password="pw") as r:
        key_hash = contract.hash_api_key(API_KEY)
        cfg = contract.KeyConfig(
            "team", "ha-key", contract.key_id_of(key_hash), contract.Limits(tokens_per_day=100_000)
        )
        r.set(contract.key_config_key(key_hash), cfg.encode())
        r.wait(1, 2000)
    gw = GatewayProcess(group.url(), mock_upstream.url, tmp_path, ATLAS_REDIS_TIMEOUT_SECONDS="0.3").start()
    try:
        client = openai.OpenAI(base_url=gw.url + "/v1", api_key=API_KEY, max_retries=0, timeout=15)

        def ask() -> int:
            reply = client.chat.completions.create(
                model=MODEL, max_tokens=5, messages=[{"role": "user", "content": "hello"}]
            )
            return reply.usage.total_tokens

        answered = ask()
        old = group.kill_master()
        refusals: list[int] = []

        def answer() -> tuple[int] | None:
            try:
                return (ask(),)
            except openai.InternalServerError as exc:  # 503 quota_store_unavailable (fail-closed)
                assert exc.status_code == 503, exc
                refusals.append(exc.status_code)
                return None

        answered += wait_for("an answer after the failover", answer, 30, interval=0.05)[0]
        refused = len(refusals)
        assert group.master_port() != old
        answered += ask()
        usage = httpx.get(gw.url + "/v1/usage", headers={"Authorization": f"Bearer {API_KEY}"}).json()
        assert usage["usage"]["tokensToday"] == answered
        assert usage["usage"]["requestsToday"] == 3
        print(f"\nSDK calls refused during the failover: {refused}")
    finally:
        gw.stop()
