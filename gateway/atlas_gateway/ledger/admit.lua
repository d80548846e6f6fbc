-- Atlas admission: check every limit of every subject (the key, then its quota) and, only if
-- all allow the request, reserve in one atomic step. A rejected request writes nothing except
-- the purge of leases that had already expired (which is housekeeping, not consumption).
--
-- KEYS, 8 per subject i (b = (i-1)*8):
--   b+1 bucket:req   b+2 bucket:tok   b+3 lease (zset)   b+4 lease:tok (hash)
--   b+5 usage day hash   b+6 usage month hash   b+7 lease:cost (hash)
--   b+8 lease:sum (hash: n, tok, cost: the running totals of the subject's live leases)
--   then one more, KEYS[n*8+1]: the first subject's undone zset (tombstones, see undo.lua)
-- ARGV (what changes per request first, so the gateway can pre-encode the rest):
--   1 request id   2 tokens to reserve   3 ms until the UTC day ends   4 ms until the month ends
--   5 prompt tokens (the part of 2 that cannot shrink)   6 sequences generated (0 = none)
--   7 cost to reserve on subject 1, 8 on subject 2 (micro-units of its price list's currency)
--   9 1 = refuse the request if it is demoted (Sheddable requests are being shed), else 0
--   10 lease TTL (ms)   11 number of subjects   12 day hash TTL (s)   13 month hash TTL (s)
--   then 14 per subject (a = 13 + (i-1)*14): requestsPerSecond, burst, tokensPerMinute,
--   tokensPerDay, tokensPerMonth, maxConcurrent   (0 = no limit of that kind),
--   shrink (1 = onBudgetShortfall Shrink), minCompletionTokens,
--   costPerDay, costPerMonth (micro-units; 0 = none: then no cost work at all),
--   softTokensPerDay, softTokensPerMonth, softCostPerDay, softCostPerMonth (cost in micro-units)
-- Soft budgets: once a subject's settled usage has reached one, a request that fits every hard
-- limit is admitted all the same, demoted: the gateway treats it as Sheddable. Settled usage
-- only (reservations are upper bounds: counted, they would demote requests that end far below
-- the soft budget), so the gateway, the operator's Demoted condition and /v1/usage agree. The
-- first one reached (key before quota; tokens/day, tokens/month, cost/day, cost/month) is
-- returned; with ARGV 9 set the request is refused instead (reason 9), writing nothing.
-- Shrink: when a day/month budget of a Shrink subject cannot hold the reservation but can hold
-- the prompt plus at least min(minCompletionTokens, cap) per sequence, the completion cap is
-- lowered to what fits it (the lowest over all such budgets); every check then uses the lowered
-- reservation, which is what is reserved and returned. Cost budgets never shrink: they refuse.
-- Returns {admitted 1|0, reason, subject index, retry ms,
--          req limit, req remaining, req reset ms, tok limit, tok remaining, tok reset ms,
--          tokens reserved, soft budget passed (0 none, 1 softTokensPerDay, 2 softTokensPerMonth,
--          3 softCostPerDay, 4 softCostPerMonth), the subject index whose soft budget it is}
--   reason: 0 ok, 1 requests/s, 2 concurrency, 3 tokens/min, 4 larger than tokens/min,
--           5 tokens/day, 6 tokens/month, 7 cost/day, 8 cost/month,
--           9 demoted while Sheddable requests are being shed (ARGV 9),
--           99 undone (the gateway gave up on this request id
--           and undid it: a call that runs late, after a Redis stall, must leave nothing).
--   Limits of -1 mean "no such limit anywhere".
-- Cost per call does not depend on how many requests are in flight: the day/month budgets read
-- the running totals in lease:sum (kept by this script, settle, undo and the purge below), never
-- the leases themselves, and at most PURGE expired leases are purged per subject per call.

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

local rid = ARGV[1]
local reserve = tonumber(ARGV[2])
local day_reset = tonumber(ARGV[3])
local month_reset = tonumber(ARGV[4])
local prompt = tonumber(ARGV[5])
local sequences = tonumber(ARGV[6])
local shed_demoted = ARGV[9] == '1'
local lease_ttl = tonumber(ARGV[10])
local n = tonumber(ARGV[11])
local day_ttl = tonumber(ARGV[12])
local month_ttl = tonumber(ARGV[13])
local BASE = 13
local PER = 14
local KPER = 8
local PURGE = 100  -- expired leases purged per subject per call (each lease is purged once)

if redis.call('ZSCORE', KEYS[n * KPER + 1], rid) then
  return {0, 99, 1, 0, -1, -1, 0, -1, -1, 0, 0, 0, 0}
end

local reason, who, retry = 0, 0, 0
local function reject(r, i, ms)
  if reason == 0 then reason, who, retry = r, i, ms end
end

-- header candidates: {limit, level before this request, refill per ms (0 = none), fixed reset ms}
local req_c, tok_c = nil, nil
local function offer_req(c) if req_c == nil or c[2] < req_c[2] then req_c = c end end
local function offer_tok(c) if tok_c == nil or c[2] < tok_c[2] then tok_c = c end end

local function bucket_level(key, size, per_ms)
  local h = redis.call('HMGET', key, 'tokens', 'ts')
  if not h[1] then return size end
  local level = tonumber(h[1]) + (now - tonumber(h[2])) * per_ms
  if level > size then level = size end
  return level
end

-- The running totals of a subject's live leases: {n leases, tokens reserved, cost reserved}.
-- They are in step with the leases when n is the lease count; otherwise (leases written by a
-- gateway of a version without totals, during a rolling upgrade) they are counted once, the
-- slow way, and written back.
local function totals(lk, ltk, lck, sk)
  local h = redis.call('HMGET', sk, 'n', 'tok', 'cost')
  local n = tonumber(h[1] or '0')
  local count = redis.call('ZCARD', lk)
  if n == count then return n, tonumber(h[2] or '0'), tonumber(h[3] or '0'), false end
  local tok, cost = 0, 0
  for _, v in ipairs(redis.call('HVALS', ltk)) do tok = tok + tonumber(v) end
  for _, v in ipairs(redis.call('HVALS', lck)) do cost = cost + tonumber(v) end
  return count, tok, cost, true
end

-- Purge at most PURGE leases whose TTL passed (a gateway died mid-request): frees their slots
-- and takes their reservations out of the totals. Leases expire no faster than they are
-- admitted, so bounded steps keep up; until purged, an expired lease still counts (refuses
-- more, never less).
local function purge(s, lk, ltk, lck)
  local expired = redis.call('ZRANGEBYSCORE', lk, '-inf', now, 'LIMIT', 0, PURGE)
  if #expired == 0 then return end
  local toks = redis.call('HMGET', ltk, unpack(expired))
  local costs = redis.call('HMGET', lck, unpack(expired))
  for j = 1, #expired do
    s.tok = s.tok - tonumber(toks[j] or '0')
    s.cost_live = s.cost_live - tonumber(costs[j] or '0')
  end
  s.n = s.n - redis.call('ZREM', lk, unpack(expired))
  redis.call('HDEL', ltk, unpack(expired))
  redis.call('HDEL', lck, unpack(expired))
  s.dirty = true
end

local state = {}
-- Pass 1: purge expired leases, read what the day/month budgets have left, lower the cap
-- where a Shrink subject's budget asks for it.
local cap = 0
if sequences > 0 then cap = (reserve - prompt) / sequences end
local full_cap = cap
for i = 1, n do
  local k = (i - 1) * KPER
  local a = BASE + (i - 1) * PER
  local tpd, tpmo, maxc = tonumber(ARGV[a + 4]), tonumber(ARGV[a + 5]), tonumber(ARGV[a + 6])
  local cpd, cpmo = tonumber(ARGV[a + 9]), tonumber(ARGV[a + 10])
  local costed = (cpd > 0 or cpmo > 0)
  local s = {leased = (maxc > 0 or tpd > 0 or tpmo > 0 or costed), costed = costed}
  state[i] = s
  if s.leased then
    s.n, s.tok, s.cost_live, s.dirty = totals(KEYS[k + 3], KEYS[k + 4], KEYS[k + 7], KEYS[k + 8])
    purge(s, KEYS[k + 3], KEYS[k + 4], KEYS[k + 7])
  end
  if costed then
    -- cost: settled (day/month `cost`) + live cost reservations + this request <= limit
    s.cost = tonumber(ARGV[6 + i])
    if cpd > 0 then
      s.cost_day_left = cpd - tonumber(redis.call('HGET', KEYS[k + 5], 'cost') or '0') - s.cost_live
    end
    if cpmo > 0 then
      s.cost_month_left = cpmo - tonumber(redis.call('HGET', KEYS[k + 6], 'cost') or '0') - s.cost_live
    end
  end
  if tpd > 0 or tpmo > 0 then
    if tpd > 0 then
      s.day_left = tpd - tonumber(redis.call('HGET', KEYS[k + 5], 'settled') or '0') - s.tok
    end
    if tpmo > 0 then
      s.month_left = tpmo - tonumber(redis.call('HGET', KEYS[k + 6], 'settled') or '0') - s.tok
    end
    if ARGV[a + 7] == '1' and sequences > 0 then
      local least = math.min(tonumber(ARGV[a + 8]), full_cap)
      for _, left in ipairs({s.day_left or reserve, s.month_left or reserve}) do
        if left < reserve then
          local fits = math.floor((left - prompt) / sequences)
          if fits >= least and fits >= 1 and fits < cap then cap = fits end
        end
      end
    end
  end
end
if cap < full_cap then reserve = prompt + cap * sequences end

-- Pass 2: every check, with the (possibly lowered) reservation.
for i = 1, n do
  local k = (i - 1) * KPER
  local a = BASE + (i - 1) * PER
  local rps, burst, tpm = tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3])
  local tpd, tpmo, maxc = tonumber(ARGV[a + 4]), tonumber(ARGV[a + 5]), tonumber(ARGV[a + 6])
  local s = state[i]
  s.rps, s.burst, s.tpm = rps, burst, tpm

  if rps > 0 then
    local per_ms = rps / 1000
    local level = bucket_level(KEYS[k + 1], burst, per_ms)
    s.req_level = level
    offer_req({burst, level, per_ms, 0})
    if level < 1 then reject(1, i, math.ceil((1 - level) / per_ms)) end
  end
  if maxc > 0 then
    local inflight = s.n  -- the lease count, after the purge
    offer_req({maxc, maxc - inflight, 0, 0})
    if inflight >= maxc then reject(2, i, 1000) end
  end
  if tpm > 0 then
    local per_ms = tpm / 60000
    local level = bucket_level(KEYS[k + 2], tpm, per_ms)
    s.tok_level = level
    offer_tok({tpm, level, per_ms, 0})
    if reserve > tpm then reject(4, i, 60000)
    elseif level < reserve then reject(3, i, math.ceil((reserve - level) / per_ms)) end
  end
  if tpd > 0 then
    offer_tok({tpd, s.day_left, 0, day_reset})
    if s.day_left < reserve then reject(5, i, day_reset) end
  end
  if tpmo > 0 then
    offer_tok({tpmo, s.month_left, 0, month_reset})
    if s.month_left < reserve then reject(6, i, month_reset) end
  end
  if s.costed then
    if s.cost_day_left and s.cost_day_left < s.cost then reject(7, i, day_reset) end
    if s.cost_month_left and s.cost_month_left < s.cost then reject(8, i, month_reset) end
  end
end

-- Soft budgets: the first one a subject's settled usage has reached demotes the request.
local function soft_reached(k, a)
  local std, stmo = tonumber(ARGV[a + 11]), tonumber(ARGV[a + 12])
  local scd, scmo = tonumber(ARGV[a + 13]), tonumber(ARGV[a + 14])
  if std > 0 and tonumber(redis.call('HGET', KEYS[k + 5], 'settled') or '0') >= std then return 1 end
  if stmo > 0 and tonumber(redis.call('HGET', KEYS[k + 6], 'settled') or '0') >= stmo then return 2 end
  if scd > 0 and tonumber(redis.call('HGET', KEYS[k + 5], 'cost') or '0') >= scd then return 3 end
  if scmo > 0 and tonumber(redis.call('HGET', KEYS[k + 6], 'cost') or '0') >= scmo then return 4 end
  return 0
end
local demoted, demoted_by = 0, 0
for i = 1, n do
  demoted = soft_reached((i - 1) * KPER, BASE + (i - 1) * PER)
  if demoted > 0 then
    demoted_by = i
    break
  end
end
if demoted > 0 and shed_demoted then reject(9, demoted_by, 1000) end

local admitted = (reason == 0)
if admitted then
  for i = 1, n do
    local k = (i - 1) * KPER
    local s = state[i]
    if s.rps > 0 then
      redis.call('HSET', KEYS[k + 1], 'tokens', s.req_level - 1, 'ts', now)
      redis.call('PEXPIRE', KEYS[k + 1], math.ceil(s.burst / s.rps * 1000) + 1000)
    end
    if s.tpm > 0 then
      local level = s.tok_level - reserve
      redis.call('HSET', KEYS[k + 2], 'tokens', level, 'ts', now)
      -- expire only once the bucket would be full again (a missing bucket reads as full)
      redis.call('PEXPIRE', KEYS[k + 2], math.ceil((s.tpm - level) / (s.tpm / 60000)) + 1000)
    end
    if s.leased then
      local lk, ltk, sk = KEYS[k + 3], KEYS[k + 4], KEYS[k + 8]
      if redis.call('ZADD', lk, now + lease_ttl, rid) == 0 then
        -- the id had a lease already (ids are unique per request: never, but it must not skew
        -- the totals): this reservation replaces that one
        s.n = s.n - 1
        s.tok = s.tok - tonumber(redis.call('HGET', ltk, rid) or '0')
        s.cost_live = s.cost_live - tonumber(redis.call('HGET', KEYS[k + 7], rid) or '0')
        redis.call('HDEL', KEYS[k + 7], rid)
      end
      redis.call('HSET', ltk, rid, reserve)
      s.n, s.tok = s.n + 1, s.tok + reserve
      -- the newest lease expires last: keep the keys at least that long
      redis.call('PEXPIRE', lk, lease_ttl + 60000)
      redis.call('PEXPIRE', ltk, lease_ttl + 60000)
      if s.costed then
        redis.call('HSET', KEYS[k + 7], rid, s.cost)
        redis.call('PEXPIRE', KEYS[k + 7], lease_ttl + 60000)
        s.cost_live = s.cost_live + s.cost
      end
      redis.call('HSET', sk, 'n', s.n, 'tok', s.tok, 'cost', s.cost_live)
      redis.call('PEXPIRE', sk, lease_ttl + 60000)
      s.dirty = false
    end
    local dk = KEYS[k + 5]
    -- a day hash needs its TTL once, when it is created (the day it counts never moves)
    if redis.call('HINCRBY', dk, 'requests', 1) == 1 then redis.call('EXPIRE', dk, day_ttl) end
    redis.call('HSET', dk, 'last', now)
  end
end

-- a refused request (or a subject without the write above) still keeps its purge in the totals
for i = 1, n do
  local s = state[i]
  if s.dirty then
    local k = (i - 1) * KPER
    if s.n > 0 then
      redis.call('HSET', KEYS[k + 8], 'n', s.n, 'tok', s.tok, 'cost', s.cost_live)
      -- a recount may have created it: it lives as long as its leases
      local ttl = redis.call('PTTL', KEYS[k + 3])
      if ttl > 0 then redis.call('PEXPIRE', KEYS[k + 8], ttl) end
    else
      redis.call('DEL', KEYS[k + 8])
    end
  end
end

local function render(c, used)
  if c == nil then return -1, -1, 0 end
  local level = c[2]
  if admitted then level = level - used end
  local remaining = math.floor(level)
  if remaining < 0 then remaining = 0 end
  local reset = c[4]
  if c[3] > 0 then
    reset = math.ceil((c[1] - level) / c[3])
    if reset < 0 then reset = 0 end
  end
  return c[1], remaining, reset
end

local rl, rr, rs = render(req_c, 1)
local tl, tr, ts = render(tok_c, reserve)
return {admitted and 1 or 0, reason, who, retry, rl, rr, rs, tl, tr, ts, reserve, demoted, demoted_by}
