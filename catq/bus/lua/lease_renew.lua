-- Bus.renew_lease(): extend the lease while the token is the newest.
-- KEYS = lease key, fencing counter.
-- ARGV = token, holder, ttl ms.
-- Returns 1 if the token is still the newest (lease re-set), else 0.

if redis.call('GET', KEYS[2]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
return 1
