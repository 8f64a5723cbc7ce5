-- Bus.publish_policy_version(): publish a version only while the fencing token is current.
-- KEYS = fencing counter, weights stream, policy version key.
-- ARGV = token, version, message payload ('' for none).
-- Returns nil (nothing written) when fenced out, else the weights entry id ('' when no message).

if redis.call('GET', KEYS[1]) ~= ARGV[1] then return false end
local id = ''
if ARGV[3] ~= '' then id = redis.call('XADD', KEYS[2], '*', 'message', ARGV[3]) end
redis.call('SET', KEYS[3], ARGV[2])
return id
