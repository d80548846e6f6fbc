-- Shared by settle.lua and undo.lua (admission.py prepends this file to both when it loads them:
-- Redis scripts cannot import one another). The running totals beside the leases (lease:sum,
-- see admit.lua) must come off by exactly what the lease held, in both scripts alike.

-- Drop request `rid`'s lease on one subject, with its reservation from the running totals
-- (lease:sum, see admit.lua): what the lease hashes hold is what comes off, whatever the
-- caller believes it reserved. Returns 1 when there was a lease.
local function drop_lease(lk, ltk, lck, sk, rid)
  if redis.call('ZREM', lk, rid) == 0 then return 0 end
  local tok = tonumber(redis.call('HGET', ltk, rid) or '0')
  local cost = tonumber(redis.call('HGET', lck, rid) or '0')
  redis.call('HDEL', ltk, rid)
  if cost ~= 0 then redis.call('HDEL', lck, rid) end
  local h = redis.call('HMGET', sk, 'n', 'tok', 'cost')
  local n = tonumber(h[1] or '0') - 1
  if n > 0 then
    redis.call('HSET', sk, 'n', n, 'tok', tonumber(h[2] or '0') - tok, 'cost', tonumber(h[3] or '0') - cost)
  else
    redis.call('DEL', sk)  -- the last lease: the totals are exactly 0 (admit.lua recounts out-of-step ones)
  end
  return 1
end
