-- Look up a cache entry, or lead it (docs/cache.md). One entry per key; its own slot.
-- KEYS: entry    ARGV: job_id, now, lead_s, ttl_s
-- Returns {'hit', answer, source job id, written at}: the answer is there (whole: it is
-- written by one HSET in cache_put.lua, so a half-written entry cannot be read);
-- {'wait', leader, lead_until}: an identical job runs and its lead holds: wait for it
-- (`waiters` makes its end publish on the cache channel);
-- {'lead', ''}: nobody runs it (or the leader's lead ran out: its worker died): run it,
-- then cache_put.lua (success) or cache_drop.lua (anything else).
local answer, source, at, leader, lead_until = unpack(redis.call('HMGET', KEYS[1],
  'answer', 'source', 'at', 'leader', 'lead_until'))
if answer then return {'hit', answer, source, at} end
local now = tonumber(ARGV[2])
if leader and leader ~= ARGV[1] and tonumber(lead_until) > now then
  redis.call('HSET', KEYS[1], 'waiters', 1)
  return {'wait', leader, lead_until}
end
redis.call('HSET', KEYS[1], 'leader', ARGV[1], 'lead_until', now + tonumber(ARGV[3]))
redis.call('EXPIRE', KEYS[1], ARGV[4])
return {'lead', ''}
