-- Create job records in state `queued`, once each, for many jobs in one call.
-- Idempotent: an existing record is left as it is.
-- KEYS: job_1, batch_1, job_2, batch_2, ...  (a placeholder batch key when the job has none)
-- ARGV: ttl_s, batch_id_1, submitted_at_1, batch_id_2, submitted_at_2, ...
-- Returns one entry per job: "new", or "<state>:<sent>" where sent is 1 once the producer
-- saw Kafka acknowledge the job (sent.lua), so a resumed bulk submit sends nothing twice.
local ttl = ARGV[1]
local out = {}
for i = 1, #KEYS / 2 do
  local job, batch = KEYS[2 * i - 1], KEYS[2 * i]
  local batch_id, at = ARGV[2 * i], ARGV[2 * i + 1]
  local st = redis.call('HGET', job, 'state')
  if st then
    out[i] = st .. ':' .. (redis.call('HGET', job, 'sent') or '0')
  else
    redis.call('HSET', job, 'state', 'queued', 'attempt', 0, 'submitted_at', at, 'sent', 0)
    redis.call('EXPIRE', job, ttl)
    if batch_id ~= '' then
      redis.call('HSET', job, 'batch_id', batch_id)
      redis.call('HINCRBY', batch, 'total', 1)
      redis.call('HINCRBY', batch, 'queued', 1)
      redis.call('EXPIRE', batch, ttl)
    end
    out[i] = 'new'
  end
end
return out
