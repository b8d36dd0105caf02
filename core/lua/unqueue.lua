-- Take back records that enqueue.lua made for jobs Kafka then refused: only a job never
-- acknowledged by Kafka (sent = 0) that no worker has touched (no job key; read only, so
-- passed as an argument, as in enqueue.lua).
-- KEYS: sub_1, batch_sub_1, ...   ARGV: job_key_1, batch_id_1, job_key_2, ...
-- Returns how many records were removed.
local removed = 0
for i = 1, #KEYS / 2 do
  local sub, batch = KEYS[2 * i - 1], KEYS[2 * i]
  local job, batch_id = ARGV[2 * i - 1], ARGV[2 * i]
  if redis.call('HGET', sub, 'sent') == '0' and redis.call('EXISTS', job) == 0 then
    redis.call('DEL', sub)
    if batch_id ~= '' then redis.call('HINCRBY', batch, 'total', -1) end
    removed = removed + 1
  end
end
return removed
