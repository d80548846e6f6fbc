-- Atlas undo: resolve a request whose admission or settlement outcome the gateway never learnt
-- (the call timed out or its connection was lost: the script may have run, may run later when a
-- stalled Redis resumes, or never ran). Idempotent per request id, so the gateway retries it
-- until Redis answers:
--   * the request's lease is the proof that its admission ran and was not settled yet: only
--     then are the counters touched (lease and reservation dropped, `actual` tokens settled,
--     the tokens-per-minute bucket given back what was reserved but not used, and for an
--     undone admission its request count taken back);
--   * the id is tombstoned for `tombstone TTL`: admit.lua refuses to lease a tombstoned id, so
--     an admission that runs after its undo (queued behind a stall) leaves nothing either.
-- A lease that already expired (and was purged) is not billed: that is the crash case, where
-- the TTL is the only bound.
--
-- KEYS, 7 per subject i (b = (i-1)*7), as settle.lua:
--   b+1 bucket:tok   b+2 lease (zset)   b+3 lease:tok (hash)   b+4 usage day hash   b+5 usage month hash
--   b+6 lease:cost (hash)   b+7 lease:sum (hash: the running totals of the live leases)
--   then KEYS[n*7+1]: the first subject's undone zset (the one admit.lua checks)
-- ARGV, as settle.lua:
--   1 request id   2 real tokens   3 tokens reserved   4, 5 real cost on subject 1, 2 (micro-units)
--   6 number of subjects   7 day hash TTL (s)   8 month hash TTL (s)
--   then 2 per subject: tokensPerMinute (0 = none), 1 = cost-limited
--   then (8 + 2n + 1) tombstone TTL (ms), (8 + 2n + 2) 1 = undo the admission itself, 0 = a settlement
-- Returns the number of leases dropped (0: nothing was left to undo).

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

local rid = ARGV[1]
local actual = tonumber(ARGV[2])
local reserved = tonumber(ARGV[3])
local n = tonumber(ARGV[6])
local day_ttl = tonumber(ARGV[7])
local month_ttl = tonumber(ARGV[8])
local tomb_ttl = tonumber(ARGV[8 + 2 * n + 1])
local admission = ARGV[8 + 2 * n + 2] == '1'
local tomb = KEYS[n * 7 + 1]

-- drop_lease(lk, ltk, lck, sk, rid): lease_totals.lua, prepended when the script is loaded.

local dropped = 0
for i = 1, n do
  local k = (i - 1) * 7
  dropped = dropped + drop_lease(KEYS[k + 2], KEYS[k + 3], KEYS[k + 6], KEYS[k + 7], rid)
end

if dropped > 0 then
  for i = 1, n do
    local k = (i - 1) * 7
    local tpm = tonumber(ARGV[7 + 2 * i])
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
      if redis.call('HINCRBY', KEYS[k + 4], 'settled', actual) == actual then
        redis.call('EXPIRE', KEYS[k + 4], day_ttl)
      end
      if redis.call('HINCRBY', KEYS[k + 5], 'settled', actual) == actual then
        redis.call('EXPIRE', KEYS[k + 5], month_ttl)
      end
    end
    if admission and redis.call('EXISTS', KEYS[k + 4]) == 1 then
      redis.call('HINCRBY', KEYS[k + 4], 'requests', -1)
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
end

redis.call('ZREMRANGEBYSCORE', tomb, '-inf', now)
redis.call('ZADD', tomb, now + tomb_ttl, rid)
redis.call('PEXPIRE', tomb, tomb_ttl + 60000)
return dropped
