-- Bus.take_token() (ingest's rate limit): one client's token bucket, shared by every ingest.
-- KEYS = the client's bucket (a hash: tokens, at = Redis time in µs of the last update).
-- ARGV = refill rate (tokens/s), burst (bucket size).
-- Redis's own clock (TIME) so every replica agrees. "allow-oom": a bucket is two small fields
-- that expire, and refusing it when Redis is out of memory would refuse reads (GET) as well.
-- Returns the seconds until one token is there, as a string: "0" when one was taken now.
#!lua flags=allow-oom
local rate, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local now = redis.call('TIME')
local now_us = tonumber(now[1]) * 1000000 + tonumber(now[2])
local state = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(state[1]) or burst
local at = tonumber(state[2]) or now_us
tokens = math.min(burst, tokens + math.max(0, now_us - at) / 1000000 * rate)
local wait = 0
if tokens >= 1 then
  tokens = tokens - 1
else
  wait = (1 - tokens) / rate
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', tostring(now_us))
redis.call('PEXPIRE', KEYS[1], math.ceil((burst - tokens) / rate * 1000) + 1000)
return tostring(wait)
