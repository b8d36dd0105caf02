-- The producer records jobs as submitted (queued), once each, for many jobs in one call.
-- Idempotent: a job that exists (submitted, or already taken by a worker) is left as it is.
-- Writes only the producer's keys (`sub:`); reads the worker's job key.
-- KEYS: sub_1, job_1, batch_sub_1, sub_2, job_2, batch_sub_2, ...
-- ARGV: ttl_s, batch_id_1, submitted_at_1, batch_id_2, submitted_at_2, ...
-- Returns one entry per job: "new", or "<state>:<sent>" where sent is 1 once the producer
-- saw Kafka acknowledge the job (sent.lua), so a resumed bulk submit sends nothing twice.
local ttl = ARGV[1]
local out = {}
for i = 1, #KEYS / 3 do
  local sub, job, batch = KEYS[3 * i - 2], KEYS[3 * i - 1], KEYS[3 * i]
  local batch_id, at = ARGV[2 * i], ARGV[2 * i + 1]
  local st = redis.call('HGET', job, 'state')
  local sent = redis.call('HGET', sub, 'sent')
  if st or sent then
    out[i] = (st or 'queued') .. ':' .. (sent or '0')
  else
    redis.call('HSET', sub, 'submitted_at', at, 'sent', 0)
    if batch_id ~= '' then
      redis.call('HSET', sub, 'batch_id', batch_id)
      redis.call('HINCRBY', batch, 'total', 1)
      redis.call('EXPIRE', batch, ttl)
    end
    redis.call('EXPIRE', sub, ttl)
    out[i] = 'new'
  end
end
return out
