"""The ledger: admission, settlement, undo and lease refresh of requests against every limit kind,
each one atomic Lua script call in Redis. Knows nothing of HTTP requests, bodies or upstreams."""
