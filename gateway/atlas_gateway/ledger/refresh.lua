-- Atlas lease refresh: push a still-running request's lease expiry forward, so a stream that
-- outlives ATLAS_LEASE_TTL_SECONDS keeps its concurrency slot and token reservation. The
-- gateway calls it every TTL/3 while a request is upstream (never for short requests).
--
-- KEYS, 4 per subject: lease (zset), lease:tok (hash), lease:cost (hash), lease:sum (hash).   ARGV: 1 request id, 2 lease TTL (ms).
-- Only a lease that still exists is refreshed: a refresh that arrives after the settlement (or
-- after the lease expired and was purged) must not bring it back. Returns the leases refreshed.

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local rid = ARGV[1]
local ttl = tonumber(ARGV[2])
local refreshed = 0
for i = 1, #KEYS, 4 do
  if redis.call('ZSCORE', KEYS[i], rid) then
    redis.call('ZADD', KEYS[i], now + ttl, rid)
    redis.call('PEXPIRE', KEYS[i], ttl + 60000)
    redis.call('PEXPIRE', KEYS[i + 1], ttl + 60000)
    redis.call('PEXPIRE', KEYS[i + 2], ttl + 60000)
    redis.call('PEXPIRE', KEYS[i + 3], ttl + 60000)  -- the totals live as long as their leases
    refreshed = refreshed + 1
  end
end
return refreshed
