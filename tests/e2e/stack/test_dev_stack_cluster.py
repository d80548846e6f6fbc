"""`REDIS_URL=<a Redis Cluster> make dev-up`: the dev stack uses that cluster instead of starting
a Redis (cluster mode detected by both planes), driven by the openai SDK and kubectl: the demo
key works, usage (read by the operator from the cluster) shows in `kubectl get`, and dev-down
leaves the cluster it did not start running."""

from __future__ import annotations

import json

import openai
import pytest
import redis

from atlas_core import contract
from atlas_devstack.redis_cluster import RedisCluster
from atlas_devstack.stack import DevStack
from atlas_devstack.waiting import wait_for
from tests.fixtures.cluster import require_tools

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def cluster_stack(tmp_path_factory):
    require_tools()
    with RedisCluster(masters=3, replicas=1) as cluster:
        dev = DevStack(
            tmp_path_factory.mktemp("dev-cluster"), upstream_url="", usage_interval=1.0, redis_url=cluster.url
        )
        with dev:
            yield dev, cluster


def test_dev_stack_on_a_redis_cluster(cluster_stack):
    stack, cluster = cluster_stack
    assert stack.env["REDIS_URL"] == cluster.url and "ATLAS_DEV_OWN_REDIS_URL" not in stack.env
    sdk = openai.OpenAI(
        base_url=stack.env["ATLAS_GATEWAY_URL"] + "/v1", api_key=stack.env["ATLAS_DEMO_KEY"], max_retries=0, timeout=10
    )
    for _ in range(2):
        reply = sdk.chat.completions.create(
            model="llama-3.1-8b-instruct", max_tokens=8, messages=[{"role": "user", "content": "hello cluster"}]
        )
        assert reply.usage.total_tokens > 0
    for service in ("gateway", "operator"):  # both planes found the cluster by themselves
        log = (stack.logs / f"{service}.log").read_text(errors="replace")
        assert "Traceback" not in log, log[-3000:]
    assert "Redis Cluster mode" in (stack.logs / "gateway.log").read_text()

    def usage():
        obj = json.loads(stack.control_plane.kubectl("get", "atlaskey", "search-frontend", "-o", "json").stdout)
        found = (obj.get("status") or {}).get("usage") or {}
        return found.get("requestsToday", 0) >= 2 and found

    shown = wait_for(
        "usage in status, read by the operator from the cluster", usage, 30, interval=0.1, retry=(Exception,)
    )
    assert shown["tokensToday"] > 0
    # config and counters live on the cluster, spread over its masters by slot
    client = redis.RedisCluster.from_url(cluster.url)
    try:
        # the self-healing loop (every 3 s) stamps the epoch after its full sync: a MULTI-free
        # pipeline across the cluster's nodes
        wait_for(
            "the operator's config epoch",
            lambda: client.exists(contract.CONFIG_EPOCH),
            15,
            interval=0.1,
            retry=(Exception,),
        )
        assert client.keys("atlas:v2:*", target_nodes=redis.RedisCluster.PRIMARIES)
    finally:
        client.close()


def test_dev_down_leaves_a_cluster_it_did_not_start(cluster_stack):
    stack, cluster = cluster_stack
    stopped = stack.down(quiet=True)
    assert "redis" not in stopped
    assert all(server.ping() for server in cluster.servers.values())
