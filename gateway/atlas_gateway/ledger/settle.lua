-- Atlas settlement: end one admitted request. Drops its lease (concurrency slot and token
-- reservation), adds the real tokens to the day/month `settled` counters, and gives the
-- tokens-per-minute bucket back what was reserved but not used (or takes the overrun).
--
-- KEYS, 7 per subject i (b = (i-1)*7):
--   b+1 bucket:tok   b+2 lease (zset)   b+3 lease:tok (hash)   b+4 usage day hash   b+5 usage month hash
--   b+6 lease:cost (hash)   b+7 lease:sum (hash: the running totals of the live leases)
-- ARGV:
--   1 request id   2 real tokens   3 tokens reserved at admission
--   4 real cost on subject 1, 5 on subject 2 (micro-units; 0 for a subject without a price list)
--   6 number of subjects   7 day hash TTL (s)   8 month hash TTL (s)
--   then 2 per subject (8 + 2i - 1, 8 + 2i): tokensPerMinute (0 = none), 1 = cost-limited
--   (unused: a lease's cost reservation is dropped whenever it has one, so that a subject whose
--   cost limit was removed while requests were in flight leaks nothing)
-- The real cost is added to the day/month `cost` fields (micro-units).
-- Returns the number of leases that were still present (0 when they had expired or were
-- already settled: the caller guards against a double settle, this makes it harmless too).

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

local rid = ARGV[1]
local actual = tonumber(ARGV[2])
local reserved = tonumber(ARGV[3])
local n = tonumber(ARGV[6])
local day_ttl = tonumber(ARGV[7])
local month_ttl = tonumber(ARGV[8])

-- drop_lease(lk, ltk, lck, sk, rid): lease_totals.lua, prepended when the script is loaded.

local dropped = 0
for i = 1, n do
  local k = (i - 1) * 7
  local tpm = tonumber(ARGV[7 + 2 * i])
  dropped = dropped + drop_lease(KEYS[k + 2], KEYS[k + 3], KEYS[k + 6], KEYS[k + 7], rid)
  local cost = tonumber(ARGV[3 + i])
  if cost > 0 then
    if redis.call('HINCRBY', KEYS[k + 4], 'cost', cost) == cost and redis.call('TTL', KEYS[k + 4]) < 0 then
      redis.call('EXPIRE', KEYS[k + 4], day_ttl)
    end
    if redis.call('HINCRBY', KEYS[k + 5], 'cost', cost) == cost and redis.call('TTL', KEYS[k + 5]) < 0 then
      redis.call('EXPIRE', KEYS[k + 5], month_ttl)
    end
  end
  if actual > 0 then
    -- TTL once, when the field is created: a hash without TTL would never go away
    if redis.call('HINCRBY', KEYS[k + 4], 'settled', actual) == actual then
      redis.call('EXPIRE', KEYS[k + 4], day_ttl)
    end
    if redis.call('HINCRBY', KEYS[k + 5], 'settled', actual) == actual then
      redis.call('EXPIRE', KEYS[k + 5], month_ttl)
    end
  end
  if tpm > 0 and actual ~= reserved then
    local key = KEYS[k + 1]
    local per_ms = tpm / 60000
    local h = redis.call('HMGET', key, 'tokens', 'ts')
    local level = tpm
    if h[1] then
      level = tonumber(h[1]) + (now - tonumber(h[2])) * per_ms
      if level > tpm then level = tpm end
    end
    level = level + reserved - actual
    if level > tpm then level = tpm end
    redis.call('HSET', key, 'tokens', level, 'ts', now)
    redis.call('PEXPIRE', key, math.ceil((tpm - level) / per_ms) + 1000)
  end
end
return dropped
