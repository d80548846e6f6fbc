"""The gateway on a real Redis Cluster (3 masters + 3 replicas on loopback, joined by
``redis-cli --cluster create``): routing by slot, exactness across gateways, slot migration
(ASK, then MOVED) under the gateway's feet, and cluster detection."""

from __future__ import annotations

import asyncio
from datetime import datetime, timezone

import aiohttp
import httpx
import redis

from atlas_core import cluster, contract
from atlas_gateway.metering.bounds import Meter
from atlas_gateway.routes import route
from atlas_gateway.settings import Settings
from tests.fixtures.gateway import write_key

MODEL = "llama-3.1-8b-instruct"
BODY = {"model": MODEL, "messages": [{"role": "user", "content": "Count to ten."}], "max_tokens": 100}


def chat(gw, key: str, **headers) -> httpx.Response:
    return httpx.post(
        gw.url + "/v1/chat/completions", json=BODY, timeout=10, headers={"authorization": f"Bearer {key}", **headers}
    )


def test_slot_maths_agrees_with_the_servers(cluster_client):
    names = [
        contract.day_usage_key(contract.key_subject("team", "a"), "2026-12-01", contract.quota_subject("team", "q")),
        contract.key_config_key("ab" * 32),
        contract.lease_key(contract.key_subject("x", "y")),
        "plain-key",
    ]
    for name in names:
        assert cluster.key_slot(name) == cluster_client.cluster_keyslot(name), name


def test_admission_settlement_and_usage_on_a_cluster(redis_cluster, cluster_client, mock_upstream, start_gateway):
    """Keys with and without a quota land in different slots (and nodes); each admission is one
    script call on the node of its slot; /v1/usage reads them back (redis-py's cluster pipeline)."""
    write_key(redis_cluster.url, "sk-c-solo", "solo", contract.Limits(tokens_per_day=100_000, max_concurrent=4))
    write_key(
        redis_cluster.url,
        "sk-c-shared",
        "shared-a",
        contract.Limits(tokens_per_day=100_000),
        quota="pool",
        quota_limits=contract.Limits(tokens_per_day=100_000),
    )
    gw = start_gateway(redis_cluster.url, mock_upstream.url, ATLAS_REDIS_CLUSTER="true")
    for key in ("sk-c-solo", "sk-c-shared"):
        for _ in range(3):
            resp = chat(gw, key, **{"x-mock-prompt-tokens": "10", "x-mock-completion-tokens": "5"})
            assert resp.status_code == 200, resp.text
    solo = httpx.get(gw.url + "/v1/usage", headers={"authorization": "Bearer sk-c-solo"}).json()
    shared = httpx.get(gw.url + "/v1/usage", headers={"authorization": "Bearer sk-c-shared"}).json()
    assert solo["usage"]["tokensToday"] == 45 and solo["usage"]["requestsToday"] == 3
    assert shared["usage"]["tokensToday"] == 45 and shared["quota"]["usage"]["tokensToday"] == 45
    # the counters really are spread over the cluster, each admission's keys in one slot
    now = datetime.now(timezone.utc)
    solo_day, _ = contract.usage_keys(contract.key_subject("team", "solo"), now)
    shared_day, _ = contract.usage_keys(
        contract.key_subject("team", "shared-a"), now, contract.quota_subject("team", "pool")
    )
    quota_day, _ = contract.usage_keys(contract.quota_subject("team", "pool"), now)
    assert cluster_client.keyslot(shared_day) == cluster_client.keyslot(quota_day) != cluster_client.keyslot(solo_day)
    assert int(cluster_client.hget(quota_day, "settled")) == 45
    # every lease released
    assert cluster_client.zcard(contract.lease_key(contract.key_subject("team", "solo"))) == 0


async def test_200_concurrent_requests_through_2_gateways_over_2_keys_never_overshoot(
    redis_cluster, cluster_client, mock_upstream, start_gateway
):
    """The issue's exactness check: a quota whose day budget fits exactly 20 requests, two keys
    bound to it, 200 concurrent requests split over two gateway processes."""
    bound = Meter.from_settings(Settings(upstream_url="http://unused")).bound(route("chat"), BODY)
    budget = 20 * bound.reserve
    for name in ("left", "right"):
        write_key(
            redis_cluster.url,
            f"sk-c-{name}",
            name,
            contract.Limits(),
            quota="exact",
            quota_limits=contract.Limits(tokens_per_day=budget),
        )
    gateways = [start_gateway(redis_cluster.url, mock_upstream.url, ATLAS_REDIS_CLUSTER="true") for _ in range(2)]
    # the mock bills exactly the reservation, so settling refunds nothing: exactly 20 fit
    headers = {
        "x-mock-latency-ms": "100",
        "x-mock-prompt-tokens": str(bound.prompt),
        "x-mock-completion-tokens": str(bound.reserve - bound.prompt),
    }
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

        async def one(i: int) -> int:
            gw, key = gateways[i % 2], ("sk-c-left", "sk-c-right")[(i // 2) % 2]
            async with session.post(
                gw.url + "/v1/chat/completions", json=BODY, headers={**headers, "authorization": f"Bearer {key}"}
            ) as resp:
                await resp.read()
                return resp.status

        statuses = await asyncio.gather(*(one(i) for i in range(200)))
    assert statuses.count(200) == 20 and statuses.count(429) == 180, sorted(set(statuses))
    quota_day, _ = contract.usage_keys(contract.quota_subject("team", "exact"), datetime.now(timezone.utc))
    assert int(cluster_client.hget(quota_day, "settled")) == budget
    assert cluster_client.zcard(contract.lease_key(contract.quota_subject("team", "exact"))) == 0
    print(
        f"\ncluster exactness: {statuses.count(200)} admitted, {statuses.count(429)} refused (429), "
        f"settled {budget} of a budget of {budget} tokens, 0 leases left"
    )


def _migrate_slot(cluster_nodes, slot: int, source, target, *, finish: bool) -> None:
    """Move one slot's keys from ``source`` to ``target`` (CLUSTER SETSLOT + MIGRATE); without
    ``finish`` the slot stays in migration (the source answers ASK for keys it no longer has)."""

    def node(port: int) -> redis.Redis:
        return redis.Redis(port=port)

    src, dst = node(source.port), node(target.port)
    dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", source.node_id)
    src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", target.node_id)
    while keys := src.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 100):
        src.execute_command("MIGRATE", "127.0.0.1", target.port, "", 0, 5000, "KEYS", *keys)
    if finish:
        for master in cluster_nodes:
            if master.master:
                node(master.port).execute_command("CLUSTER", "SETSLOT", slot, "NODE", target.node_id)


def test_gateway_follows_ask_then_moved_when_a_slot_migrates(
    redis_cluster, cluster_client, mock_upstream, start_gateway
):
    """A resharding under the gateway's feet: the quota's slot is migrated to another master.
    While it is in migration, ASK then TRYAGAIN (retried, then 503: nothing ran); once it is
    done, MOVED (the gateway updates its map). The budget counts on across the move."""
    small = {**BODY, "max_tokens": 5}
    reserve = Meter.from_settings(Settings(upstream_url="http://unused")).bound(route("chat"), small).reserve
    write_key(
        redis_cluster.url,
        "sk-c-move",
        "mover",
        contract.Limits(),
        quota="moving",
        quota_limits=contract.Limits(tokens_per_day=3 * reserve),
    )
    gw = start_gateway(redis_cluster.url, mock_upstream.url, ATLAS_REDIS_CLUSTER="true")
    # the mock bills exactly the reservation: three requests fit the budget
    tokens = {"x-mock-prompt-tokens": str(reserve - 5), "x-mock-completion-tokens": "5"}

    def ask() -> httpx.Response:
        return httpx.post(
            gw.url + "/v1/chat/completions",
            json=small,
            timeout=10,
            headers={"authorization": "Bearer sk-c-move", **tokens},
        )

    slot = cluster.key_slot(contract.quota_subject("team", "moving"))
    source = redis_cluster.master_of(slot)
    target = next(n for n in redis_cluster.nodes() if n.master and n.port != source.port)
    assert ask().status_code == 200  # counters now exist on the source
    _migrate_slot(redis_cluster.nodes(), slot, source, target, finish=False)
    # Mid-migration the source answers ASK (its keys are gone) and the target TRYAGAIN (an
    # admission's keys are only partly there): never run, so an honest 503, nothing charged
    during = ask()
    assert during.status_code == 503, during.text
    _migrate_slot(redis_cluster.nodes(), slot, source, target, finish=True)
    assert ask().status_code == 200  # MOVED: the map is updated, the request served
    assert redis_cluster.master_of(slot).port == target.port
    # whichever node served them, the third request fits and then the budget is spent
    assert [ask().status_code for _ in range(2)] == [200, 429]
    quota_day, _ = contract.usage_keys(contract.quota_subject("team", "moving"), datetime.now(timezone.utc))
    assert int(cluster_client.hget(quota_day, "settled")) == 3 * reserve
    assert "Traceback" not in gw.log()


def test_cluster_mode_is_detected_when_not_named(redis_cluster, cluster_client, mock_upstream, start_gateway):
    write_key(redis_cluster.url, "sk-c-auto", "auto", contract.Limits(max_concurrent=2))
    gw = start_gateway(redis_cluster.url, mock_upstream.url)  # ATLAS_REDIS_CLUSTER unset: auto
    assert chat(gw, "sk-c-auto").status_code == 200
    assert httpx.get(gw.url + "/readyz").status_code == 200
    assert "Redis Cluster mode" in gw.log()


async def test_a_reply_means_the_replica_has_it_too(redis_cluster, cluster_client):
    """ClusterFastRedis answers a call only once WAIT saw a replica acknowledge it: read from the
    replica right after the replies, every admission is there (no failover can lose it)."""
    from atlas_gateway.auth.principal import Principal
    from atlas_gateway.ledger.admission import Admission
    from atlas_gateway.store.cluster import ClusterFastRedis

    fast = ClusterFastRedis(redis_cluster.url, 2.0, wait_ms=1000)
    try:
        admission = Admission(fast=fast, lease_ttl_seconds=60)
        key = contract.KeyConfig("team", "durable", "0123abcd", contract.Limits(max_concurrent=1000), quota="dq")
        principal = Principal(key, contract.QuotaConfig("team", "dq", contract.Limits(max_concurrent=1000)))
        decisions = await asyncio.gather(*(admission.admit(principal, f"r{i}", 10) for i in range(300)))
        assert all(d.admitted for d in decisions)
        master = redis_cluster.master_of(cluster.key_slot(principal.tag))
        replica = redis.Redis(port=redis_cluster.replica_of(master).port)
        try:
            replica.execute_command("READONLY")
            assert replica.zcard(contract.lease_key(contract.quota_subject("team", "dq"))) == 300
        finally:
            replica.close()
        assert fast.unacked == 0
        # a stalled replica: the reply waits for WAIT's timeout, then goes through, counted
        stalled = redis_cluster.servers[redis_cluster.replica_of(master).port]
        stalled.pause()
        try:
            fast.wait_ms = 300
            fast._wait = b"*3\r\n$4\r\nWAIT\r\n$1\r\n1\r\n$3\r\n300\r\n"
            started = asyncio.get_running_loop().time()
            assert (await admission.admit(principal, "stalled", 10)).admitted
            assert asyncio.get_running_loop().time() - started >= 0.3 and fast.unacked == 1
        finally:
            stalled.resume()
    finally:
        await fast.aclose()
