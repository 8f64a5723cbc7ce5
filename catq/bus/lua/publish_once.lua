-- Bus.publish_once() (ingest's enqueue): entries keyed by a record, every entry or none.
-- KEYS = stream, request key, one record key per entry.
-- ARGV = ttl (s), "1" if the request key is used, request value, status field, then per entry:
--        payload, n, n field/value pairs.
-- "#!lua" (no allow-oom): refused whole, before any write, when Redis is out of memory. All reads
-- come before the first write, so an error (a record of the wrong type) leaves nothing written
-- either. Returns {replayed (0/1), msgpack [value, outcome]} where outcome has, per entry, false
-- (published now) or its record's status field.
#!lua
if ARGV[2] == '1' then
  local seen = redis.call('GET', KEYS[2])
  if seen then return {1, seen} end
end
local outcome = {}
for i = 3, #KEYS do
  if redis.call('EXISTS', KEYS[i]) == 1 then
    outcome[i - 2] = redis.call('HGET', KEYS[i], ARGV[4]) or ''
  else
    outcome[i - 2] = false
  end
end
local a = 5
for i = 3, #KEYS do
  local n = tonumber(ARGV[a + 1])
  if outcome[i - 2] == false then
    redis.call('HSET', KEYS[i], unpack(ARGV, a + 2, a + 1 + 2 * n))
    redis.call('EXPIRE', KEYS[i], ARGV[1])
    redis.call('XADD', KEYS[1], '*', 'message', ARGV[a])
  end
  a = a + 2 + 2 * n
end
local record = cmsgpack.pack({ARGV[3], outcome})
if ARGV[2] == '1' then
  redis.call('SET', KEYS[2], record, 'EX', ARGV[1])
end
return {0, record}
