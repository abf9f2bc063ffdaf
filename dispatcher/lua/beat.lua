--[[ beat.lua: renew this dispatcher's heartbeat, unless another process holds its id now.

A process cut off from Redis (or paused) for longer than the heartbeat TTL loses its id: a
peer puts its tasks back, and a dispatcher starting on the same host may claim the id. Then two
live processes would write the same records, each putting back the other's tasks. Each
process's heartbeat carries its own instance; a beat that finds another's writes nothing.

KEYS[1]  the heartbeat    KEYS[2]  the set of dispatcher ids
ARGV[1]  the heartbeat's value (JSON, with the instance)    ARGV[2]  TTL in ms
ARGV[3]  this process's instance    ARGV[4]  the dispatcher id
Returns 1, or 0 if the heartbeat had lapsed (nobody held the id: this process takes it again);
"LOSTID <the other's heartbeat>" as an error if another process holds it.
]]
local owner = redis.call('GET', KEYS[1])
if owner and not string.find(owner, ARGV[3], 1, true) then
  return redis.error_reply('LOSTID ' .. owner)
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('SADD', KEYS[2], ARGV[4])
if owner then
  return 1
end
return 0
