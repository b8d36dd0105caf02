-- A worker takes a job: queued (or never seen, or running on a worker whose lease ran
-- out) -> running, with a lease: owner + expiry, renewed while it runs (lease.lua).
-- Returns {state, attempt}. A terminal job is returned as it is and must be skipped.
-- Returns {'leased', lease_until} while another worker's lease on the running job holds:
-- the caller waits and asks again, so a job never runs twice at once.
-- Returns {'conflict', recorded batch_id} when the record written at enqueue names another
-- batch than the message: the message is not trusted, and nothing is written.
-- KEYS: job, batch (a placeholder when none)
-- ARGV: batch_id ("" when none), worker, now, ttl_s, lease_s
local st = redis.call('HGET', KEYS[1], 'state')
if st and st ~= 'queued' and st ~= 'running' then
  return {st, tonumber(redis.call('HGET', KEYS[1], 'attempt') or '0')}
end
if st then
  local recorded = redis.call('HGET', KEYS[1], 'batch_id') or ''
  if recorded ~= ARGV[1] then return {'conflict', recorded} end
end
if st == 'running' then
  local owner, lease = unpack(redis.call('HMGET', KEYS[1], 'worker', 'lease_until'))
  if owner ~= ARGV[2] and tonumber(lease or '0') > tonumber(ARGV[3]) then
    return {'leased', lease}
  end
end
local attempt = redis.call('HINCRBY', KEYS[1], 'attempt', 1)
redis.call('HSET', KEYS[1], 'state', 'running', 'worker', ARGV[2], 'started_at', ARGV[3],
  'lease_until', tonumber(ARGV[3]) + tonumber(ARGV[5]))
if ARGV[1] ~= '' then redis.call('HSET', KEYS[1], 'batch_id', ARGV[1]) end
redis.call('EXPIRE', KEYS[1], ARGV[4])
if ARGV[1] ~= '' then
  if not st then redis.call('HINCRBY', KEYS[2], 'total', 1) end
  if st == 'queued' then redis.call('HINCRBY', KEYS[2], 'queued', -1) end
  if st ~= 'running' then redis.call('HINCRBY', KEYS[2], 'running', 1) end
  redis.call('EXPIRE', KEYS[2], ARGV[4])
end
return {'running', attempt}
