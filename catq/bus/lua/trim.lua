-- Bus.trim(): trim a stream without removing what a group still needs.
-- KEYS = stream.
-- ARGV = max length, "1" if the stream is not trimmed without a group.
-- Removes the oldest entries beyond max length, but only those below every group's *needed* id:
-- its oldest pending entry, or when nothing is pending its last-delivered id (entries after it
-- are undelivered; the entry itself is kept, which is merely conservative). Entries below that id
-- were delivered and acked by the group. Atomic (a script), so no delivery or ack can slip
-- between measuring and trimming. It reads at most as many entries as it deletes (plus none), so
-- the cost is amortised per entry.

local function less(a, b)
  local am, as = string.match(a, '^(%d+)-(%d+)$')
  local bm, bs = string.match(b, '^(%d+)-(%d+)$')
  am, bm = tonumber(am), tonumber(bm)
  if am ~= bm then return am < bm end
  return tonumber(as) < tonumber(bs)
end
local excess = redis.call('XLEN', KEYS[1]) - tonumber(ARGV[1])
if excess <= 0 then return 0 end
local needed = nil
local groups = redis.call('XINFO', 'GROUPS', KEYS[1])
if #groups == 0 and ARGV[2] == '1' then return 0 end
for _, g in ipairs(groups) do
  local info = {}
  for i = 1, #g, 2 do info[g[i]] = g[i + 1] end
  local id = info['last-delivered-id']
  if tonumber(info['pending']) > 0 then
    id = redis.call('XPENDING', KEYS[1], info['name'])[2]
  end
  if needed == nil or less(id, needed) then needed = id end
end
local stop = '+'
if needed ~= nil then
  if needed == '0-0' then return 0 end
  stop = '(' .. needed
end
local doomed = redis.call('XRANGE', KEYS[1], '-', stop, 'COUNT', excess)
if #doomed == 0 then return 0 end
local ms, seq = string.match(doomed[#doomed][1], '^(%d+)-(%d+)$')
return redis.call('XTRIM', KEYS[1], 'MINID', ms .. '-' .. (tonumber(seq) + 1))
