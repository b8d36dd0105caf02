-- Note that Kafka acknowledged these jobs (KEYS: their `sub` keys). Records that expired
-- or were never made are left alone.
for _, sub in ipairs(KEYS) do
  if redis.call('EXISTS', sub) == 1 then redis.call('HSET', sub, 'sent', 1) end
end
return #KEYS
