"""Redis clients (the hot-path RESP client, Redis Cluster, Sentinel failover), Lua script runners,
and what a failed call means. Knows nothing of keys, limits or requests."""
