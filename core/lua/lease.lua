-- Renew (lease_s > 0) or give up (lease_s = 0) this worker's leases on running jobs.
-- A job that ended, or that another worker took over, is left alone.
-- KEYS: job keys    ARGV: worker, now, lease_s
-- Returns how many leases were changed.
local changed = 0
for _, job in ipairs(KEYS) do
  local st, owner = unpack(redis.call('HMGET', job, 'state', 'worker'))
  if st == 'running' and owner == ARGV[1] then
    redis.call('HSET', job, 'lease_until', tonumber(ARGV[2]) + tonumber(ARGV[3]))
    changed = changed + 1
  end
end
return changed
