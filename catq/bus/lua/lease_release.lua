-- Bus.release_lease(): drop the lease at a clean stop.
-- KEYS = lease key, fencing counter.
-- ARGV = token.
-- Deletes the lease only while the token is the newest.

if redis.call('GET', KEYS[2]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
return 1
