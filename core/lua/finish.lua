-- The one terminal transition: succeeded | failed | cancelled | expired. First write wins;
-- every later call is a no-op. Returns {1, previous state} when this call wrote it (or
-- an earlier call with this very record did: a retry after a lost reply), {0, state} when
-- the job had already ended. With `requested` it ends only a queued job
-- whose cancel was requested (a worker answering a cancel request): {0, ''} otherwise.
-- A batch_id other than the one recorded is refused with an error: nothing is written.
-- The job moves in its job list's indexes (keys.index_key): out of `open`, into its
-- state's (and, failed, its error code's), scored by its submit time; a failed batch job
-- counts under `e.<code>` in the batch's counters (the console's failure groups).
-- KEYS: job, sub, batch, batch_done (this shard's; placeholders when the job has none),
--       cancel, then the indexes: all, open, state, code (a placeholder when no code)
-- With a digest (a message that never reached a claim: an invalid body, a failure before
-- its claim), the job ends only if that message is the one submitted (claim.lua's check):
-- {0, 'forged'} or {0, 'unsubmitted'} otherwise, and nothing is written.
-- ARGV: job_id, state, record (Result as JSON), ttl_s, done channel, batch_id ("" when
--       none), requested ("1" or ""), digest ("": not checked), strict ("1": a job needs
--       its submit record), submitted at (the score when no index has the job yet),
--       error code ("" when none)
if ARGV[8] and ARGV[8] ~= '' then
  local expected = redis.call('HGET', KEYS[2], 'digest') or redis.call('HGET', KEYS[1], 'digest')
  if expected and expected ~= ARGV[8] then return {0, 'forged'} end
  if not expected and ARGV[9] == '1' then return {0, 'unsubmitted'} end
end
local st, recorded = unpack(redis.call('HMGET', KEYS[1], 'state', 'batch_id'))
if st and st ~= 'running' then
  if redis.call('HGET', KEYS[1], 'record') == ARGV[3] then return {1, st} end
  return {0, st}
end
local submitted = redis.call('EXISTS', KEYS[2]) == 1
if ARGV[7] == '1' and (st or not submitted or redis.call('EXISTS', KEYS[5]) == 0) then
  return {0, st or ''}
end
if not st and submitted then recorded = redis.call('HGET', KEYS[2], 'batch_id') end
if (st or submitted) and (recorded or '') ~= ARGV[6] then
  return redis.error_reply('batch_id ' .. ARGV[6] .. ' is not the recorded one')
end
redis.call('HSET', KEYS[1], 'state', ARGV[2], 'record', ARGV[3])
redis.call('HINCRBY', KEYS[1], 'terminal_writes', 1)
redis.call('EXPIRE', KEYS[1], ARGV[4])
if ARGV[6] ~= '' then
  redis.call('HSET', KEYS[1], 'batch_id', ARGV[6])
  if st then
    redis.call('HINCRBY', KEYS[3], 'running', -1)
  else
    if not submitted then redis.call('HINCRBY', KEYS[3], 'unrecorded', 1) end
    redis.call('HINCRBY', KEYS[3], 'left', 1)
  end
  redis.call('HINCRBY', KEYS[3], ARGV[2], 1)
  redis.call('RPUSH', KEYS[4], ARGV[1])
  redis.call('EXPIRE', KEYS[3], ARGV[4])
  redis.call('EXPIRE', KEYS[4], ARGV[4])
end
local at = redis.call('ZSCORE', KEYS[6], ARGV[1]) or ARGV[10]
redis.call('ZADD', KEYS[6], 'NX', at, ARGV[1])
redis.call('ZREM', KEYS[7], ARGV[1])
redis.call('ZADD', KEYS[8], at, ARGV[1])
local indexes = {KEYS[6], KEYS[8]}
if ARGV[11] ~= '' then
  redis.call('ZADD', KEYS[9], at, ARGV[1])
  indexes[3] = KEYS[9]
  if ARGV[6] ~= '' then redis.call('HINCRBY', KEYS[3], 'e.' .. ARGV[11], 1) end
end
for _, index in ipairs(indexes) do redis.call('EXPIRE', index, ARGV[4]) end
redis.call('PUBLISH', ARGV[5], ARGV[2])
return {1, st or ''}
