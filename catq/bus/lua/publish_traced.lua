-- Bus.publish() of a message about a prompt: the XADD and its line in the prompt's trace list.
-- KEYS = stream, the prompt's trace list.
-- ARGV = stream name, trace ttl (s), then the entry's field/value pairs.

local id = redis.call('XADD', KEYS[1], '*', unpack(ARGV, 3))
redis.call('RPUSH', KEYS[2], ARGV[1] .. ' ' .. id)
redis.call('EXPIRE', KEYS[2], tonumber(ARGV[2]))
return id
