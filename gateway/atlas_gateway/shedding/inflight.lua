-- Atlas shedding view: publish this gateway process's in-flight count and read everyone else's,
-- in one round trip (gateway/atlas_gateway/load_view.py).
--
-- KEYS[1]: the shed:inflight hash (field = process id, value = "<count>:<expiry ms>")
-- ARGV: 1 process id   2 in-flight count   3 TTL (ms) of this entry (and of the hash)
-- Expiry is on Redis's clock, so gateway clocks need not agree. Expired fields (processes that
-- died or lost Redis) are deleted here.
-- Returns {in flight of the other live processes, number of other live processes}.

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[3])
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2] .. ':' .. (now + ttl))
local entries = redis.call('HGETALL', KEYS[1])
local others, peers = 0, 0
for i = 1, #entries, 2 do
  local field, value = entries[i], entries[i + 1]
  local sep = string.find(value, ':', 1, true)
  local expires = sep and tonumber(string.sub(value, sep + 1)) or 0
  if expires < now then
    redis.call('HDEL', KEYS[1], field)
  elseif field ~= ARGV[1] then
    others = others + (tonumber(string.sub(value, 1, sep - 1)) or 0)
    peers = peers + 1
  end
end
redis.call('PEXPIRE', KEYS[1], ttl)
return {others, peers}
