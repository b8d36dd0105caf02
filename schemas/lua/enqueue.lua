-- Create a job's record in state `queued`, once. Idempotent: a second call changes nothing.
-- Returns false for a new job, else {state, sent}: `sent` is 1 once the producer saw Kafka
-- acknowledge the job (mark_sent), so a resumed bulk submit sends nothing twice.
-- KEYS: job, batch ("" when none)    ARGV: batch_id, submitted_at, ttl_s
local st = redis.call('HGET', KEYS[1], 'state')
if st then return {st, redis.call('HGET', KEYS[1], 'sent') or '0'} end
redis.call('HSET', KEYS[1], 'state', 'queued', 'attempt', 0, 'submitted_at', ARGV[2], 'sent', 0)
if ARGV[1] ~= '' then redis.call('HSET', KEYS[1], 'batch_id', ARGV[1]) end
redis.call('EXPIRE', KEYS[1], ARGV[3])
if ARGV[1] ~= '' then
  redis.call('HINCRBY', KEYS[2], 'total', 1)
  redis.call('HINCRBY', KEYS[2], 'queued', 1)
  redis.call('EXPIRE', KEYS[2], ARGV[3])
end
return false
