"""The bench's API keys, written into Redis with the Redis contract of the gateway under test.

Run as ``python -m benchmarks.keys REDIS_URL`` with that gateway's checkout first on
PYTHONPATH (benchmarks.gateways does this), so that "before" and "after" gateways of different
contract versions each find a key they can read. It prints the pid of the redis-server that
holds the bench key's counters (on a Redis Cluster, the master of their slot), whose CPU per
request the bench reports.

The bench key has **every limit kind** on the key and on its AtlasQuota: requests/s with a
burst, tokens/minute, tokens/day and /month, maxConcurrent, and cost per day and month with a
price list, all too high to bite: the bench measures the full admission and settlement, not a
short cut for unlimited keys.
"""

from __future__ import annotations

import json
import sys

from atlas_devstack.redis_cluster import sync_client as redis_client  # noqa: F401 (exactness.py too)

BENCH_KEY = "sk-atlas-bench-0000000000000000000000"
EXACT_KEY = "sk-atlas-exact-0000000000000000000000"
NAMESPACE = "bench"


def never_biting(contract):
    fields = dict(
        requests_per_second=1e6,
        burst=10**6,
        tokens_per_minute=10**12,
        tokens_per_day=10**13,
        tokens_per_month=10**14,
        max_concurrent=10_000,
    )
    names = {name for _, name in getattr(contract.Limits, "_FIELDS", ())}
    if "cost_per_day" in names:  # cost budgets (AtlasPriceList) in this contract version
        fields.update(cost_per_day=1e9, cost_per_month=1e10)
    return contract.Limits(**fields)


def price_list(contract):
    if not hasattr(contract, "PriceTable"):
        return None
    return contract.PriceTable.from_spec(
        "bench-prices",
        {
            "currency": "USD",
            "prices": [{"model": "llama-*", "input": 0.1, "output": 0.2}],
            "default": {"input": 0.5, "output": 1.0},
        },
    )


def write_key(r, contract, key: str, name: str, limits, quota_limits=None, prices=None) -> None:
    """A key (and its quota when ``quota_limits`` is given) as the operator would write them."""
    key_hash = contract.hash_api_key(key)
    extra = {"price_list": prices} if prices is not None else {}
    quota = f"{name}-quota" if quota_limits is not None else None
    cfg = contract.KeyConfig(NAMESPACE, name, contract.key_id_of(key_hash), limits, quota=quota, **extra)
    r.set(contract.key_config_key(key_hash), cfg.encode())
    if quota:
        r.set(
            contract.quota_config_key(NAMESPACE, quota),
            contract.QuotaConfig(NAMESPACE, quota, quota_limits, **extra).encode(),
        )


def _counters_key(contract) -> str:
    """A key in the bench key's counter slot (contracts with hash tags take the quota's subject
    as the tag; earlier ones a single subject)."""
    key, quota = contract.key_subject(NAMESPACE, "bench"), None
    if hasattr(contract, "quota_subject"):
        quota = contract.quota_subject(NAMESPACE, "bench-quota")
    try:
        return contract.lease_key(key, quota)
    except TypeError:
        return contract.lease_key(key)


def write_bench_key(redis_url: str) -> int | None:
    """Write the bench key and its quota; the pid of the redis-server holding its counters."""
    import redis

    from atlas_core import contract

    r = redis_client(redis_url)
    try:
        limits = never_biting(contract)
        write_key(r, contract, BENCH_KEY, "bench", limits, limits, price_list(contract))
        if isinstance(r, redis.RedisCluster):
            info = r.info("server", target_nodes=r.get_node_from_key(_counters_key(contract)))
        else:
            info = r.info("server")
        return int(info["process_id"]) if "process_id" in info else None
    finally:
        r.close()


def spread_key(i: int) -> str:
    return f"sk-atlas-spread-{i:022d}"


def write_spread_keys(redis_url: str, n: int) -> None:
    """``n`` keys with no limits and no quota (benchmarks.capacity): thousands of requests held
    at once over many keys, so that what is measured is the gateway holding them, not one key's
    admission growing with the leases it holds."""
    from atlas_core import contract

    r = redis_client(redis_url)
    try:
        for i in range(n):
            write_key(r, contract, spread_key(i), f"spread-{i}", contract.Limits())
    finally:
        r.close()


if __name__ == "__main__":
    if sys.argv[2:3] == ["--spread"]:
        write_spread_keys(sys.argv[1], int(sys.argv[3]))
        print(json.dumps({"spread": int(sys.argv[3])}))
    else:
        print(json.dumps({"redis_pid": write_bench_key(sys.argv[1])}))
