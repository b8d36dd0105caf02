-- The producer records jobs as submitted (queued), once each, for many jobs in one call.
-- Idempotent: a job that exists (submitted, or already taken by a worker) is left as it is.
-- Writes only the producer's keys (`sub:`). The worker's job key, which it only reads,
-- comes as an argument: Redis checks declared KEYS for write access (ACLs), and it is in
-- the same slot as the job's sub key (one hash tag), so a cluster serves it too.
-- KEYS: sub_1, batch_sub_1, sub_2, batch_sub_2, ...
-- ARGV: ttl_s, job_key_1, batch_id_1, submitted_at_1, metadata_1, job_key_2, ...
-- (metadata: the job's metadata as JSON, '' for none; kept for a job ended while queued)
-- Returns one entry per job: "new", or "<state>:<sent>" where sent is 1 once the producer
-- saw Kafka acknowledge the job (sent.lua), so a resumed bulk submit sends nothing twice.
local ttl = ARGV[1]
local out = {}
for i = 1, #KEYS / 2 do
  local sub, batch = KEYS[2 * i - 1], KEYS[2 * i]
  local job, batch_id, at, meta = ARGV[4 * i - 2], ARGV[4 * i - 1], ARGV[4 * i], ARGV[4 * i + 1]
  local st = redis.call('HGET', job, 'state')
  local sent = redis.call('HGET', sub, 'sent')
  if st or sent then
    out[i] = (st or 'queued') .. ':' .. (sent or '0')
  else
    if meta ~= '' then
      redis.call('HSET', sub, 'submitted_at', at, 'sent', 0, 'metadata', meta)
    else
      redis.call('HSET', sub, 'submitted_at', at, 'sent', 0)
    end
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
