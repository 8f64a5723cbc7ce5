-- Bus.replay_dead(): put a dead letter's message back on its stream and remove the letter.
-- KEYS = dead stream, target stream.
-- ARGV = dead entry id, payload.
-- The XDEL decides: two operators replaying one letter at once put it back once.

if redis.call('XDEL', KEYS[1], ARGV[1]) == 0 then return false end
return redis.call('XADD', KEYS[2], '*', 'message', ARGV[2], 'source', 'replay:' .. ARGV[1])
