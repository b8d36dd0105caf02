-- A worker takes a job: queued (or never seen, or running on a worker whose lease ran
-- out) -> running, with a lease: owner + expiry, renewed while it runs (lease.lua).
-- Returns {state, attempt}. A terminal job is returned as it is and must be skipped.
-- Returns {'leased', lease_until} while another worker's lease on the running job holds:
-- the caller waits and asks again, so a job never runs twice at once.
-- Returns {'conflict', recorded batch_id} when the record written at submit names another
-- batch than the message: the message is not trusted, and nothing is written.
-- Returns {'cancel', attempt} when a cancel was requested: the caller ends it `cancelled`.
-- KEYS: job, sub, batch (this shard's counters; a placeholder when none), cancel
-- ARGV: batch_id ("" when none), worker, now, ttl_s, lease_s
local st, owner, lease, attempt, recorded = unpack(redis.call('HMGET', KEYS[1],
  'state', 'worker', 'lease_until', 'attempt', 'batch_id'))
if st and st ~= 'running' then return {st, tonumber(attempt or '0')} end
local submitted = redis.call('EXISTS', KEYS[2]) == 1
if not st and submitted then recorded = redis.call('HGET', KEYS[2], 'batch_id') end
if (st or submitted) and (recorded or '') ~= ARGV[1] then return {'conflict', recorded or ''} end
if redis.call('EXISTS', KEYS[4]) == 1 then return {'cancel', tonumber(attempt or '0')} end
if st == 'running' and owner ~= ARGV[2] and tonumber(lease or '0') > tonumber(ARGV[3]) then
  return {'leased', lease}
end
local n = redis.call('HINCRBY', KEYS[1], 'attempt', 1)
redis.call('HSET', KEYS[1], 'state', 'running', 'worker', ARGV[2], 'started_at', ARGV[3],
  'lease_until', tonumber(ARGV[3]) + tonumber(ARGV[5]))
redis.call('EXPIRE', KEYS[1], ARGV[4])
if ARGV[1] ~= '' and not st then
  redis.call('HSET', KEYS[1], 'batch_id', ARGV[1])
  if not submitted then redis.call('HINCRBY', KEYS[3], 'unrecorded', 1) end
  redis.call('HINCRBY', KEYS[3], 'left', 1)
  redis.call('HINCRBY', KEYS[3], 'running', 1)
  redis.call('EXPIRE', KEYS[3], ARGV[4])
end
return {'running', n}
