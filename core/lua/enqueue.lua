-- The producer records jobs as submitted (queued), once each, for many jobs in one call.
-- Idempotent: a job that exists (submitted, or already taken by a worker) is left as it is,
-- except that a record Kafka never acknowledged and no worker touched takes the digest of
-- the message sent now (a resumed submit re-encodes its jobs).
-- Writes only the producer's keys (`sub:`). The worker's job key, which it only reads,
-- comes as an argument: Redis checks declared KEYS for write access (ACLs), and it is in
-- the same slot as the job's sub key (one hash tag), so a cluster serves it too.
-- A new job also enters its job list's `all` and `open` index (keys.index_key), scored
-- by its submit time; entries older than the TTL leave them (their records are gone).
-- KEYS: sub_1, batch_sub_1, all_1, open_1, sub_2, batch_sub_2, all_2, open_2, ...
-- ARGV: ttl_s, then per job: job_key, batch_id, submitted_at, metadata, digest
-- (metadata: the job's metadata as JSON, '' for none; kept for a job ended while queued;
-- digest: sha256 of the Kafka message's bytes, hex: a worker runs only that message)
-- Returns one entry per job: "new", or "<state>:<sent>" where sent is 1 once the producer
-- saw Kafka acknowledge the job (sent.lua), so a resumed bulk submit sends nothing twice.
local ttl = ARGV[1]
local out = {}
for i = 1, #KEYS / 4 do
  local sub, batch, all, open = KEYS[4 * i - 3], KEYS[4 * i - 2], KEYS[4 * i - 1], KEYS[4 * i]
  local a = 5 * i - 3
  local job, batch_id, at, meta, digest = ARGV[a], ARGV[a + 1], ARGV[a + 2], ARGV[a + 3], ARGV[a + 4]
  local st = redis.call('HGET', job, 'state')
  local sent = redis.call('HGET', sub, 'sent')
  if st or sent then
    if not st and sent == '0' then redis.call('HSET', sub, 'digest', digest) end
    out[i] = (st or 'queued') .. ':' .. (sent or '0')
  else
    redis.call('HSET', sub, 'submitted_at', at, 'sent', 0, 'digest', digest)
    if meta ~= '' then redis.call('HSET', sub, 'metadata', meta) end
    if batch_id ~= '' then
      redis.call('HSET', sub, 'batch_id', batch_id)
      redis.call('HINCRBY', batch, 'total', 1)
      redis.call('EXPIRE', batch, ttl)
    end
    redis.call('EXPIRE', sub, ttl)
    for _, index in ipairs({all, open}) do
      redis.call('ZADD', index, at, string.match(job, ':job:(.*)$'))
      redis.call('ZREMRANGEBYSCORE', index, '-inf', tonumber(at) - tonumber(ttl))
      redis.call('EXPIRE', index, ttl)
    end
    out[i] = 'new'
  end
end
return out
