-- Where a job's dead letter went ("partition:offset" of the dead-letter topic), on the
-- job's record, so its page and a retry can read the original message back. Only onto a
-- record that exists: a dead letter of a job without one leaves no key without a TTL.
-- KEYS: job    ARGV: position
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'dead_letter', ARGV[1])
return 1
