-- Write a cache entry's answer, after the job's own terminal write (docs/cache.md). The
-- answer, its source and its time go in one HSET: a reader sees all of them or none.
-- A job that leads the entry gives up its lead; waiters are woken.
-- KEYS: entry    ARGV: job_id, answer (JSON), now, ttl_s, channel, entry digest
redis.call('HSET', KEYS[1], 'answer', ARGV[2], 'source', ARGV[1], 'at', ARGV[3])
local leader, waiters = unpack(redis.call('HMGET', KEYS[1], 'leader', 'waiters'))
if leader == ARGV[1] then redis.call('HDEL', KEYS[1], 'leader', 'lead_until') end
redis.call('HDEL', KEYS[1], 'waiters')
redis.call('EXPIRE', KEYS[1], ARGV[4])
if waiters then redis.call('PUBLISH', ARGV[5], ARGV[6]) end
return 1
