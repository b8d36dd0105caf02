-- A cancel request (the producer's to make): a worker ends the job `cancelled` (the one
-- running it aborts it; any worker ends a queued one; a claim honours it). Writes only
-- the producer's cancel key, so a producer credential never writes a terminal state.
-- KEYS: sub, cancel    ARGV: ttl_s, job_id, cancel channel, job key (read only: see enqueue.lua)
-- Returns "requested", the terminal state the job already has, or "missing".
local st = redis.call('HGET', ARGV[4], 'state')
if st and st ~= 'running' then return st end
if not st and redis.call('EXISTS', KEYS[1]) == 0 then return 'missing' end
redis.call('SET', KEYS[2], 1, 'EX', ARGV[1])
redis.call('PUBLISH', ARGV[3], ARGV[2])
return 'requested'
