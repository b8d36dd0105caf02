-- Take back records that enqueue.lua made for jobs Kafka then refused: only a job still
-- `queued` and never acknowledged by Kafka (sent = 0), so nothing a worker touched.
-- KEYS: job_1, batch_1, job_2, batch_2, ...   ARGV: batch_id_1, batch_id_2, ... ("" when none)
-- Returns how many records were removed.
local removed = 0
for i = 1, #KEYS / 2 do
  local job, batch = KEYS[2 * i - 1], KEYS[2 * i]
  local st, sent = unpack(redis.call('HMGET', job, 'state', 'sent'))
  if st == 'queued' and sent == '0' then
    redis.call('DEL', job)
    if ARGV[i] ~= '' then
      redis.call('HINCRBY', batch, 'total', -1)
      redis.call('HINCRBY', batch, 'queued', -1)
    end
    removed = removed + 1
  end
end
return removed
