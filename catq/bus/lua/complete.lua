-- Bus.complete(): a consumer's outputs, the done markers and the XACK in one atomic step.
-- KEYS = input stream, the entry's done marker, its work's done marker (see messages.work_id),
--        the prompt's trace list, then the output streams.
-- ARGV = group, entry id, marker ttl (s), "stream id" of the input for the trace ("" when the work
--        has no prompt), then payloads (one per output stream, ARGV[i] for KEYS[i]), then the
--        output streams' names.
-- Either marker present: done already (this entry, or a duplicate entry of the same work), so only ack.

if redis.call('EXISTS', KEYS[2], KEYS[3]) > 0 then
  redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
  return 0
end
local ids = {}
local n = #KEYS - 4
for i = 5, #KEYS do
  ids[#ids + 1] = redis.call('XADD', KEYS[i], '*', 'message', ARGV[i], 'source', ARGV[2])
end
local outputs = table.concat(ids, ' ')
redis.call('SET', KEYS[2], outputs, 'EX', tonumber(ARGV[3]))
redis.call('SET', KEYS[3], outputs, 'EX', tonumber(ARGV[3]))
if ARGV[4] ~= '' then
  redis.call('RPUSH', KEYS[4], ARGV[4])
  for i = 1, n do redis.call('RPUSH', KEYS[4], ARGV[4 + n + i] .. ' ' .. ids[i]) end
  redis.call('EXPIRE', KEYS[4], tonumber(ARGV[3]))
end
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
return 1
