-- A running leader keeps its lead (like a job's lease): a dead worker's lead runs out and
-- a waiter takes it over. KEYS: entry    ARGV: job_id, now, lead_s. Returns 1 if renewed.
if redis.call('HGET', KEYS[1], 'leader') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'lead_until', tonumber(ARGV[2]) + tonumber(ARGV[3]))
return 1
