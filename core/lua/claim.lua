-- A worker takes jobs: each queued (or never seen, or running on a worker whose lease ran
-- out) -> running, with a lease: owner + expiry, renewed while it runs (lease.lua).
-- One call claims any number of jobs of one slot (the worker sends one call per slot per
-- loop tick); each job's answer is one of:
--   {state, attempt}: running now with this attempt; or a terminal job as it is (skip it);
--   {'leased', lease_until}: another worker's lease on the running job holds: the caller
--     waits and asks again, so a job never runs twice at once;
--   {'conflict', recorded batch_id}: the record written at submit names another batch than
--     the message: the message is not trusted, and nothing is written;
--   {'cancel', attempt}: a cancel was requested: the caller ends it `cancelled`.
-- KEYS: per job: job, sub, batch (this shard's counters; a placeholder when none), cancel
-- ARGV: worker, now, ttl_s, lease_s, then per job: batch_id ("" when none)
local function claim(k1, k2, k3, k4, batch, worker, now, ttl, lease_s)
  local st, owner, lease, attempt, recorded = unpack(redis.call('HMGET', k1,
    'state', 'worker', 'lease_until', 'attempt', 'batch_id'))
  if st and st ~= 'running' then return {st, tonumber(attempt or '0')} end
  local submitted = redis.call('EXISTS', k2) == 1
  if not st and submitted then recorded = redis.call('HGET', k2, 'batch_id') end
  if (st or submitted) and (recorded or '') ~= batch then return {'conflict', recorded or ''} end
  if redis.call('EXISTS', k4) == 1 then return {'cancel', tonumber(attempt or '0')} end
  if st == 'running' and owner ~= worker and tonumber(lease or '0') > tonumber(now) then
    return {'leased', lease}
  end
  local n = redis.call('HINCRBY', k1, 'attempt', 1)
  redis.call('HSET', k1, 'state', 'running', 'worker', worker, 'started_at', now,
    'lease_until', tonumber(now) + tonumber(lease_s))
  redis.call('EXPIRE', k1, ttl)
  if batch ~= '' and not st then
    redis.call('HSET', k1, 'batch_id', batch)
    if not submitted then redis.call('HINCRBY', k3, 'unrecorded', 1) end
    redis.call('HINCRBY', k3, 'left', 1)
    redis.call('HINCRBY', k3, 'running', 1)
    redis.call('EXPIRE', k3, ttl)
  end
  return {'running', n}
end

local out = {}
for j = 0, #KEYS / 4 - 1 do
  local k = 4 * j
  out[j + 1] = claim(KEYS[k + 1], KEYS[k + 2], KEYS[k + 3], KEYS[k + 4], ARGV[5 + j],
    ARGV[1], ARGV[2], ARGV[3], ARGV[4])
end
return out
