--[[ reconcile.lua: make one dispatcher's records in Redis match what it really holds.

Used in three places, always as one atomic step:
  - a dispatcher starting (mode "self", nothing known): tasks left in flight by its previous
    life go back to the head of their lists, and its token list is reset to --procs + --prefetch slots;
  - a dispatcher after a Redis outage (mode "self", its running tasks known): entries it does
    not hold are put back, entries it holds but Redis lost (AOF window) are written again.
    Not if its heartbeat lapsed meanwhile (mode "rejoin", or no heartbeat): a peer may have put
    those tasks back on their lists already, and an entry written again would put them back a
    second time at the next recovery. They stay unrecorded: their outcomes are not written,
    and the copies on the lists run again;
  - a live dispatcher recovering a dead peer (mode "peer"): only if the peer's heartbeat is
    gone, all of the peer's tasks go back and the peer is forgotten. Two dispatchers doing this
    at once cannot duplicate anything: the second finds nothing.

KEYS[1]  in-flight hash    KEYS[2]  tokens list    KEYS[3]  heartbeat key
KEYS[4]  set of dispatcher ids
ARGV[1]  "self", "rejoin" or "peer"   ARGV[2]  dispatcher id   ARGV[3]  number of slots
ARGV[4]  "self" and "rejoin": this process's instance: if another process holds the id now,
         answer "LOSTID <its heartbeat>" and write nothing
ARGV[5..] known slots as triples: slot, source list, element
Returns the number of elements put back on their lists, or -1 if the peer is alive.
]]
if ARGV[1] == 'peer' and redis.call('EXISTS', KEYS[3]) == 1 then
  return -1
end
local rejoin = ARGV[1] == 'rejoin'
if ARGV[1] ~= 'peer' then
  local owner = redis.call('GET', KEYS[3])
  if owner and not string.find(owner, ARGV[4], 1, true) then
    return redis.error_reply('LOSTID ' .. owner)
  end
  rejoin = rejoin or not owner
end

local known = {}
for i = 5, #ARGV, 3 do
  known[ARGV[i]] = true
end

-- Every list a task goes back to is checked before anything is written: Redis keeps a
-- script's writes made before an error, so a failed RPUSH halfway would leave the tasks pushed
-- before it on their lists and in flight too, pushed again at every call.
local back = {}
local present = {}
local entries = redis.call('HGETALL', KEYS[1])
for i = 1, #entries, 2 do
  local field = entries[i]
  present[field] = true
  if string.sub(field, -2) ~= ':q' and not known[field] then
    local source = redis.call('HGET', KEYS[1], field .. ':q')
    if source then
      local kind = redis.call('TYPE', source).ok
      if kind ~= 'list' and kind ~= 'none' then
        return redis.error_reply('BADKEY ' .. source .. ' holds a ' .. kind .. ', not a list')
      end
      back[#back + 1] = source
      back[#back + 1] = entries[i + 1]
    end
  end
end
for i = 1, #back, 2 do
  redis.call('RPUSH', back[i], back[i + 1])
end
local requeued = #back / 2
redis.call('DEL', KEYS[1], KEYS[2])

if ARGV[1] == 'peer' then
  redis.call('SREM', KEYS[4], ARGV[2])
  return requeued
end

for i = 5, #ARGV, 3 do
  if not rejoin or present[ARGV[i]] then
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 2], ARGV[i] .. ':q', ARGV[i + 1])
  end
end
for slot = 0, tonumber(ARGV[3]) - 1 do
  if not known[tostring(slot)] then
    redis.call('RPUSH', KEYS[2], slot)
  end
end
redis.call('SADD', KEYS[4], ARGV[2])
return requeued
