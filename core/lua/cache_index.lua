-- Note an entry in its scope's index and keep the scope within its size bound: entries
-- older than the TTL leave the index, and the oldest beyond `max_entries` are returned
-- for the caller to delete (they live in other slots).
-- KEYS: index    ARGV: entry digest, now, ttl_s, max_entries
-- Returns {new, evicted entry digests...}: new is 1 when the index was empty before (a new
-- or purged scope: the caller lists it in the scope list).
local now, ttl = tonumber(ARGV[2]), tonumber(ARGV[3])
local new = redis.call('EXISTS', KEYS[1]) == 0 and 1 or 0
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - ttl)
redis.call('EXPIRE', KEYS[1], ttl)
local over = redis.call('ZCARD', KEYS[1]) - tonumber(ARGV[4])
if over <= 0 then return {new} end
local evicted = {new}
local popped = redis.call('ZPOPMIN', KEYS[1], over)
for i = 1, #popped, 2 do evicted[#evicted + 1] = popped[i] end
return evicted
