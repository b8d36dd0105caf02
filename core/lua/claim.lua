-- A worker takes jobs: each queued (or never seen, or running on a worker whose lease ran
-- out, or failed with a retry requested) -> running, with a lease: owner + expiry, renewed
-- while it runs (lease.lua).
-- One call claims any number of jobs of one slot (the worker sends one call per slot per
-- loop tick); each job's answer is one of:
--   {state, attempt, base}: running now with this attempt (`base`: the attempts before
--     its last retry, so a retried job has max_attempts again); or a terminal job as it is
--     (skip it);
--   {'leased', lease_until}: another worker's lease on the running job holds: the caller
--     waits and asks again, so a job never runs twice at once;
--   {'conflict', recorded batch_id}: the record written at submit names another batch than
--     the message: the message is not trusted, and nothing is written;
--   {'forged', ''}: the message is not the one its submit record's digest names (someone
--     reused the job's id): nothing is written;
--   {'unsubmitted', ''}: no submit record names the job (and `strict`): nobody submitted
--     it through the SDK, the API or the enqueue step: nothing is written;
--   {'cancel', attempt}: a cancel was requested (for the job, or for its whole batch): the
--     caller ends it `cancelled`.
-- A retry (the producer's `retry` field on the submit record of a failed job) is taken
-- once: the field is removed as the job leaves `failed`, so a second delivery of the
-- resent message finds the job running or ended and skips it.
-- KEYS: per job: job, sub, batch (this shard's counters; a placeholder when none), done
--       (this shard's done list), cancel, sub batch (this shard's submit counters, where a
--       batch cancel is recorded)
-- An attempt is a delivery: a claim repeated for the delivery that holds the job (the same
-- worker, topic, partition and offset: a reply lost to a dropped connection, a retried
-- pipeline) renews its lease and returns the same attempt; a redelivery counts one more.
-- ARGV: worker, now, ttl_s, lease_s, strict ("1": a job needs its submit record), shared
--       (the tag of the job lists' keys on a single Redis, "" on a cluster), then per
--       job: batch_id ("" when none), digest (sha256 of the message's bytes, hex), delivery
--       ("worker:topic:partition:offset", "" when unknown)
local function cancelled(k5, k6, batch)
  if redis.call('EXISTS', k5) == 1 then return true end
  return batch ~= '' and redis.call('HGET', k6, 'cancelled') == '1'
end

-- A retried batch job leaves the `failed` and error code indexes for `open` (the names
-- are keys.index_key's: under `shared`'s tag on a single Redis, else in the job's slot).
local function reindex(k1, k3, job_id, batch, record, shared)
  local ok, r = pcall(cjson.decode, record or '')
  local code = ok and type(r) == 'table' and type(r.error) == 'table' and r.error.code
  local head = (shared ~= '' and shared or string.match(k1, '^(.-):job:')) .. ':sub:jx:'
  local group = ':b:' .. batch
  redis.call('ZREM', head .. 'failed' .. group, job_id)
  if type(code) == 'string' then
    redis.call('ZREM', head .. 'e.' .. code .. group, job_id)
    redis.call('HINCRBY', k3, 'e.' .. code, -1)
  end
  local at = redis.call('ZSCORE', head .. 'all' .. group, job_id)
  if at then redis.call('ZADD', head .. 'open' .. group, at, job_id) end
end

local function retried(k1, k2, k3, k4, st, shared)
  if st ~= 'failed' or redis.call('HGET', k2, 'retry') ~= '1' then return false end
  local job_id = string.match(k1, ':job:(.*)$')
  local batch = redis.call('HGET', k1, 'batch_id')
  if batch then reindex(k1, k3, job_id, batch, redis.call('HGET', k1, 'record'), shared) end
  redis.call('HDEL', k2, 'retry')
  redis.call('HDEL', k1, 'record')
  redis.call('HSET', k1, 'retry_base', redis.call('HGET', k1, 'attempt') or '0')
  redis.call('HINCRBY', k1, 'retries', 1)
  if batch then
    redis.call('HINCRBY', k3, 'failed', -1)
    redis.call('HINCRBY', k3, 'running', 1)
    redis.call('LREM', k4, 1, job_id)
  end
  return true
end

-- The message is the one submitted: its digest is the submit record's (or, once that has
-- expired, the copy the first claim made). Checked before anything else is read or written.
local function unverified(k1, k2, digest, strict)
  local expected = redis.call('HGET', k2, 'digest') or redis.call('HGET', k1, 'digest')
  if expected then
    if expected ~= digest then return {'forged', ''} end
  elseif strict == '1' then
    return {'unsubmitted', ''}
  end
  return nil
end

local function claim(k1, k2, k3, k4, k5, k6, batch, digest, delivery, worker, now, ttl, lease_s, strict,
    shared)
  local refused = unverified(k1, k2, digest, strict)
  if refused then return refused end
  local st, owner, lease, attempt, recorded, base, held = unpack(redis.call('HMGET', k1,
    'state', 'worker', 'lease_until', 'attempt', 'batch_id', 'retry_base', 'delivery'))
  local again = false
  if st and st ~= 'running' then
    if (recorded or '') ~= batch or not retried(k1, k2, k3, k4, st, shared) then
      return {st, tonumber(attempt or '0')}
    end
    again = true
  end
  local submitted = redis.call('EXISTS', k2) == 1
  if not st and submitted then recorded = redis.call('HGET', k2, 'batch_id') end
  if (st or submitted) and (recorded or '') ~= batch then return {'conflict', recorded or ''} end
  if not again and cancelled(k5, k6, batch) then return {'cancel', tonumber(attempt or '0')} end
  if st == 'running' and delivery ~= '' and held == delivery then
    redis.call('HSET', k1, 'lease_until', tonumber(now) + tonumber(lease_s))
    return {'running', tonumber(attempt), tonumber(base or '0')}
  end
  if st == 'running' and owner ~= worker and tonumber(lease or '0') > tonumber(now) then
    return {'leased', lease}
  end
  local n = redis.call('HINCRBY', k1, 'attempt', 1)
  redis.call('HSET', k1, 'state', 'running', 'worker', worker, 'started_at', now,
    'lease_until', tonumber(now) + tonumber(lease_s), 'delivery', delivery)
  redis.call('EXPIRE', k1, ttl)
  if not st then redis.call('HSET', k1, 'digest', digest) end
  if batch ~= '' and not st then
    redis.call('HSET', k1, 'batch_id', batch)
    if not submitted then redis.call('HINCRBY', k3, 'unrecorded', 1) end
    redis.call('HINCRBY', k3, 'left', 1)
    redis.call('HINCRBY', k3, 'running', 1)
    redis.call('EXPIRE', k3, ttl)
  end
  if again then base = attempt end  -- retried() just set retry_base to the attempts so far
  return {'running', n, tonumber(base or '0')}
end

local out = {}
for j = 0, #KEYS / 6 - 1 do
  local k, a = 6 * j, 7 + 3 * j
  out[j + 1] = claim(KEYS[k + 1], KEYS[k + 2], KEYS[k + 3], KEYS[k + 4], KEYS[k + 5],
    KEYS[k + 6], ARGV[a], ARGV[a + 1], ARGV[a + 2], ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5],
    ARGV[6])
end
return out
