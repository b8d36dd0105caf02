-- Note that Kafka acknowledged these jobs (KEYS: job keys). Records that expired or were
-- never made are left alone.
for _, job in ipairs(KEYS) do
  if redis.call('EXISTS', job) == 1 then redis.call('HSET', job, 'sent', 1) end
end
return #KEYS
