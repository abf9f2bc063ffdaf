--[[ fetch.lua: take up to N tasks into one dispatcher's in-flight record, in one atomic step.

Strict priority across the lists (high, then normal, then low), oldest first within each
(producers LPUSH, we take the right end). Each task taken consumes one free-worker token (a slot
number); the element and the list it came from are recorded under that slot, so recovery can put
it back at the head of its list. Scheduled tasks that are due (retries, countdown/eta) are moved
to their list first; ZREM inside this script makes that happen exactly once across dispatchers.

KEYS[1]     tokens list of this dispatcher (free slots)
KEYS[2]     in-flight hash of this dispatcher (slot -> element, slot:q -> source list)
KEYS[3..5]  the high, normal and low lists
KEYS[6..8]  the high, normal and low schedules (sorted sets, score = due time in ms)
KEYS[9]     the wake list (pushed when a task is scheduled); cleared here, since this call sees
            every schedule and reports the next due time
KEYS[10]    this dispatcher's heartbeat
ARGV[1]     most tasks to take
ARGV[2]     how many of the lists to take from, highest first: 1 takes high tasks only, while
            one waits and the dispatcher holds others (dispatcher.urgent)
ARGV[3]     this process's instance (in its heartbeat): if another process holds the id now,
            answer "LOSTID <its heartbeat>" and write nothing (dispatcher.heartbeat)

Returns an error "BADKEY <key> holds a <type>, ..." and writes nothing if one of KEYS[1..8] has
the wrong type. Otherwise {slot, list index (1..3), element, ...} when it took tasks, or a single number:
milliseconds until the next scheduled task is due, -1 if nothing is scheduled, or -2 if this
dispatcher has no free token (its local count disagrees with Redis: it must reconcile).
]]
local owner = redis.call('GET', KEYS[10])
if owner and not string.find(owner, ARGV[3], 1, true) then
  return redis.error_reply('LOSTID ' .. owner)
end

-- A key of another type (a SET by hand on a queue's name, say) would fail a write halfway:
-- Redis keeps the writes a script made before an error, so tasks already popped, or moved off
-- their schedule, would be lost. Check first, write nothing, and say which key.
local kinds = {'list', 'hash', 'list', 'list', 'list', 'zset', 'zset', 'zset'}
for i = 1, 8 do
  local kind = redis.call('TYPE', KEYS[i]).ok
  if kind ~= kinds[i] and kind ~= 'none' then
    return redis.error_reply('BADKEY ' .. KEYS[i] .. ' holds a ' .. kind .. ', not a ' .. kinds[i])
  end
end

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('DEL', KEYS[9])

for i = 1, 3 do
  local due = redis.call('ZRANGEBYSCORE', KEYS[5 + i], '-inf', now, 'LIMIT', 0, 1000)
  if #due > 0 then
    redis.call('ZREM', KEYS[5 + i], unpack(due))
    redis.call('LPUSH', KEYS[2 + i], unpack(due))
  end
end

local want = math.min(redis.call('LLEN', KEYS[1]), tonumber(ARGV[1]))
if want == 0 then
  return {-2}
end

-- One LPOP of the tokens and one HSET for the whole batch: per-task calls were most of the
-- server's time per task in a busy drain.
local out = {}
local record = {}
local taken = 0
for i = 1, tonumber(ARGV[2]) do
  if taken >= want then break end
  local elements = redis.call('RPOP', KEYS[2 + i], want - taken)
  if elements then
    local slots = redis.call('LPOP', KEYS[1], #elements)
    for j, element in ipairs(elements) do
      local slot = slots[j]
      record[#record + 1] = slot
      record[#record + 1] = element
      record[#record + 1] = slot .. ':q'
      record[#record + 1] = KEYS[2 + i]
      out[#out + 1] = slot
      out[#out + 1] = i
      out[#out + 1] = element
      if #record >= 4000 then  -- unpack() takes at most ~8000 values
        redis.call('HSET', KEYS[2], unpack(record))
        record = {}
      end
    end
    taken = taken + #elements
  end
end
if taken > 0 then
  if #record > 0 then
    redis.call('HSET', KEYS[2], unpack(record))
  end
  return out
end

local next_due = -1
for i = 1, 3 do
  local first = redis.call('ZRANGE', KEYS[5 + i], 0, 0, 'WITHSCORES')
  if #first > 0 then
    local wait = math.max(0, tonumber(first[2]) - now)
    if next_due < 0 or wait < next_due then next_due = wait end
  end
end
return {next_due}
