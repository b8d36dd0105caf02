-- A retry request (the producer's to make): marks a failed job's submit record so the
-- next claim of its message runs it again (claim.lua takes the mark once). Writes only
-- the producer's submit record, like cancel.lua; the job key is only read.
-- KEYS: sub    ARGV: job key (read only)
-- Returns 1 when the job is failed and now marked (or was marked already), else 0.
if redis.call('HGET', ARGV[1], 'state') ~= 'failed' or redis.call('EXISTS', KEYS[1]) == 0 then
  return 0
end
redis.call('HSET', KEYS[1], 'retry', '1')
return 1
