-- A leader that will not write an answer (its job failed, was cancelled or handed back)
-- gives up its lead, so a waiting job takes it over and runs itself: no follower ever
-- receives a failure that was not its own. Only the leader's own lead is dropped.
-- KEYS: entry    ARGV: job_id, channel, entry digest
-- Returns 1 when the lead was this job's.
if redis.call('HGET', KEYS[1], 'leader') ~= ARGV[1] then return 0 end
local waiters = redis.call('HGET', KEYS[1], 'waiters')
redis.call('HDEL', KEYS[1], 'leader', 'lead_until', 'waiters')
if waiters then redis.call('PUBLISH', ARGV[2], ARGV[3]) end
return 1
