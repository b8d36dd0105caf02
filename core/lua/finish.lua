-- The one terminal transition: succeeded | failed | cancelled | expired. First write wins;
-- every later call is a no-op. Returns {1, previous state} when this call wrote it,
-- {0, terminal state} when the job had already ended.
-- KEYS: job, batch, batch_done (placeholders when the job has no batch)
-- ARGV: job_id, state, record (Result as JSON), ttl_s, done channel, batch_id ("" when none)
local st = redis.call('HGET', KEYS[1], 'state')
if st and st ~= 'queued' and st ~= 'running' then return {0, st} end
redis.call('HSET', KEYS[1], 'state', ARGV[2], 'record', ARGV[3])
redis.call('HINCRBY', KEYS[1], 'terminal_writes', 1)
redis.call('EXPIRE', KEYS[1], ARGV[4])
if ARGV[6] ~= '' then
  if st then redis.call('HINCRBY', KEYS[2], st, -1) else redis.call('HINCRBY', KEYS[2], 'total', 1) end
  redis.call('HINCRBY', KEYS[2], ARGV[2], 1)
  redis.call('RPUSH', KEYS[3], ARGV[1])
  redis.call('EXPIRE', KEYS[2], ARGV[4])
  redis.call('EXPIRE', KEYS[3], ARGV[4])
end
redis.call('PUBLISH', ARGV[5], ARGV[2])
return {1, st or ''}
