-- Bus._screen(): per entry read, whether it is done and how often its handler failed.
-- KEYS = per entry: its done marker, its work's done marker, its failure counter.
-- ARGV = none.
-- Returns per entry: done (0/1), failures. One call per read instead of two commands per entry.

local out = {}
for i = 1, #KEYS, 3 do
  out[#out + 1] = math.min(redis.call('EXISTS', KEYS[i], KEYS[i + 1]), 1)
  out[#out + 1] = tonumber(redis.call('GET', KEYS[i + 2]) or '0')
end
return out
