-- Take back records that enqueue.lua made for jobs Kafka then refused: only a job never
-- acknowledged by Kafka (sent = 0) that no worker has touched (no job key).
-- KEYS: sub_1, job_1, batch_sub_1, ...   ARGV: batch_id_1, batch_id_2, ... ("" when none)
-- Returns how many records were removed.
local removed = 0
for i = 1, #KEYS / 3 do
  local sub, job, batch = KEYS[3 * i - 2], KEYS[3 * i - 1], KEYS[3 * i]
  if redis.call('HGET', sub, 'sent') == '0' and redis.call('EXISTS', job) == 0 then
    redis.call('DEL', sub)
    if ARGV[i] ~= '' then redis.call('HINCRBY', batch, 'total', -1) end
    removed = removed + 1
  end
end
return removed
