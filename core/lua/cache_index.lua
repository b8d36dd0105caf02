-- Note an entry in its scope's index and keep the scope within its size bound: entries
-- older than the TTL leave the index, and the oldest beyond `max_entries` are returned
-- for the caller to delete (they live in other slots).
-- KEYS: index    ARGV: entry digest, now, ttl_s, max_entries
-- Returns the evicted entry digests.
local now, ttl = tonumber(ARGV[2]), tonumber(ARGV[3])
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - ttl)
redis.call('EXPIRE', KEYS[1], ttl)
local over = redis.call('ZCARD', KEYS[1]) - tonumber(ARGV[4])
if over <= 0 then return {} end
local evicted = {}
local popped = redis.call('ZPOPMIN', KEYS[1], over)
for i = 1, #popped, 2 do evicted[#evicted + 1] = popped[i] end
return evicted
