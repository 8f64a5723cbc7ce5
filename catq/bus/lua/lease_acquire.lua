-- Bus.acquire_lease(): take a learner lease if nobody holds it.
-- KEYS = lease key, fencing counter.
-- ARGV = holder, ttl ms.
-- Returns the new fencing token, or 0 when the lease is held.

if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return redis.call('INCR', KEYS[2])
end
return 0
