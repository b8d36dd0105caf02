-- Take back records that enqueue.lua made for jobs Kafka then refused: only a job never
-- acknowledged by Kafka (sent = 0) that no worker has touched (no job key; read only, so
-- passed as an argument, as in enqueue.lua).
-- Its entries in its job list's `all` and `open` indexes go too.
-- KEYS: sub_1, batch_sub_1, all_1, open_1, ...   ARGV: job_key_1, batch_id_1, job_key_2, ...
-- Returns how many records were removed.
local removed = 0
for i = 1, #KEYS / 4 do
  local sub, batch = KEYS[4 * i - 3], KEYS[4 * i - 2]
  local job, batch_id = ARGV[2 * i - 1], ARGV[2 * i]
  if redis.call('HGET', sub, 'sent') == '0' and redis.call('EXISTS', job) == 0 then
    redis.call('DEL', sub)
    local id = string.match(job, ':job:(.*)$')
    redis.call('ZREM', KEYS[4 * i - 1], id)
    redis.call('ZREM', KEYS[4 * i], id)
    if batch_id ~= '' then redis.call('HINCRBY', batch, 'total', -1) end
    removed = removed + 1
  end
end
return removed
