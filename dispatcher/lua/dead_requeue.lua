--[[ dead_requeue.lua: put one dead letter back on the list it came from, exactly once.

KEYS[1]  dead-letter list (ids)    KEYS[2]  the dead letter's hash
ARGV[1]  the dead letter's id      ARGV[2]  list to use when the entry names none
Returns {status, detail}: {'requeued', list}; {'not found', ''} if the id is not in the dead
list (already requeued or purged); {'left', why} if it cannot go back. Everything is checked
before anything is written, so a letter that cannot go back stays where `dead list` shows it.
]]
if not redis.call('LPOS', KEYS[1], ARGV[1]) then
  return {'not found', ''}
end
local entry_type = redis.call('TYPE', KEYS[2])['ok']
if entry_type == 'none' then
  return {'left', 'its hash ' .. KEYS[2] .. ' is missing'}
elseif entry_type ~= 'hash' then
  return {'left', KEYS[2] .. ' is a ' .. entry_type .. ', not a hash'}
end
local entry = redis.call('HMGET', KEYS[2], 'payload', 'queue')
if not entry[1] then
  return {'left', 'it has no payload'}
end
local queue = entry[2] or ARGV[2]
local queue_type = redis.call('TYPE', queue)['ok']
if queue_type ~= 'list' and queue_type ~= 'none' then
  return {'left', 'queue ' .. queue .. ' holds a ' .. queue_type .. ', not a list'}
end
redis.call('LREM', KEYS[1], 1, ARGV[1])
redis.call('LPUSH', queue, entry[1])
redis.call('DEL', KEYS[2])
return {'requeued', queue}
