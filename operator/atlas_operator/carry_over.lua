-- Atlas upgrade carry-over (v1 -> v2): mirror a subject's v1 usage hash into its v2 hash.
-- Runs on the v2 hash alone (KEYS[1]), so it is valid on a Redis Cluster; the operator read the
-- v1 hash just before. The v2 hash remembers in `v1:<field>` how much it already took from v1,
-- so a repeated call adds only what v1 counted since (idempotent; a v1 count that went down,
-- an undone admission, goes down here too). A v1 gateway still serving during a rolling
-- upgrade keeps being carried over, one operator cycle late.
-- ARGV: 1 TTL (s) for a hash this creates, 2 v1 `last` (unix ms, or ''), then field, v1 value pairs.
-- Returns the number of fields that changed.
local changed = 0
for i = 3, #ARGV, 2 do
  local field, v1 = ARGV[i], tonumber(ARGV[i + 1])
  local seen = tonumber(redis.call('HGET', KEYS[1], 'v1:' .. field) or '0')
  if v1 ~= seen then
    redis.call('HINCRBY', KEYS[1], field, v1 - seen)
    redis.call('HSET', KEYS[1], 'v1:' .. field, v1)
    changed = changed + 1
  end
end
if ARGV[2] ~= '' and tonumber(ARGV[2]) > tonumber(redis.call('HGET', KEYS[1], 'last') or '0') then
  redis.call('HSET', KEYS[1], 'last', ARGV[2])
end
-- the gateway's scripts set a TTL only on the hash they create: a hash created here needs one
if changed > 0 and redis.call('TTL', KEYS[1]) < 0 then redis.call('EXPIRE', KEYS[1], ARGV[1]) end
return changed
