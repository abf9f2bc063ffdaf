--[[ dead_requeue.lua: put one dead letter back on the list it came from, exactly once.

KEYS[1]  dead-letter list (ids)    KEYS[2]  the dead letter's hash
ARGV[1]  the dead letter's id      ARGV[2]  list to use when the entry names none
Returns 1 if it was requeued, 0 if no such dead letter (already requeued or purged).
]]
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 0 then
  return 0
end
local entry = redis.call('HMGET', KEYS[2], 'payload', 'queue')
if entry[1] then
  redis.call('LPUSH', entry[2] or ARGV[2], entry[1])
end
redis.call('DEL', KEYS[2])
return 1
