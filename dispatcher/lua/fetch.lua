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

Returns an error "BADKEY <key> holds a <type>, ..." and takes nothing if one of KEYS[1..8] that
it needs has the wrong type. Otherwise {slot, list index (1..3), element, ...} when it took tasks, or a single number:
milliseconds until the next scheduled task is due, -1 if nothing is scheduled, -2 if this
dispatcher has no free token (its local count disagrees with Redis: it must reconcile), or -3
if its heartbeat is missing: it lapsed, and a task taken now could be put back by a peer that
sees no heartbeat, and run twice. The dispatcher takes its heartbeat back, then fetches.
]]
local owner = redis.call('GET', KEYS[10])
if owner and not string.find(owner, ARGV[3], 1, true) then
  return redis.error_reply('LOSTID ' .. owner)
end
if not owner then
  return {-3}  -- lapsed: a peer may be putting back what this one holds; take the id back first
end

-- A key of another type (a SET by hand on a queue's name, say) must not fail a write halfway:
-- Redis keeps the writes a script made before an error, so tasks already popped, or moved off
-- their schedule, would be lost. Each read that could fail is a pcall, each write's key is
-- checked before the first write it could follow, and the answer names the key. (Checking
-- every key's TYPE up front cost a tenth of the drain without --prefetch.)
local function badkey(key, want)
  return redis.error_reply('BADKEY ' .. key .. ' holds a ' .. redis.call('TYPE', key).ok .. ', not a ' .. want)
end
local function wrong(key, want)
  local kind = redis.call('TYPE', key).ok
  return kind ~= want and kind ~= 'none'
end

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('DEL', KEYS[9])

for i = 1, 3 do
  local due = redis.pcall('ZRANGEBYSCORE', KEYS[5 + i], '-inf', now, 'LIMIT', 0, 1000)
  if due.err then
    return badkey(KEYS[5 + i], 'zset')
  end
  if #due > 0 then
    if wrong(KEYS[2 + i], 'list') then
      return badkey(KEYS[2 + i], 'list')
    end
    redis.call('ZREM', KEYS[5 + i], unpack(due))
    redis.call('LPUSH', KEYS[2 + i], unpack(due))
  end
end

local free = redis.pcall('LLEN', KEYS[1])
if type(free) == 'table' then
  return badkey(KEYS[1], 'list')
end
local want = math.min(free, tonumber(ARGV[1]))
if want == 0 then
  return {-2}
end
if wrong(KEYS[2], 'hash') then
  return badkey(KEYS[2], 'hash')
end

-- One LPOP of the tokens and one HSET for the whole batch: per-task calls were most of the
-- server's time per task in a busy drain.
local out = {}
local record = {}
local taken = 0
for i = 1, tonumber(ARGV[2]) do
  if taken >= want then break end
  local elements = redis.pcall('RPOP', KEYS[2 + i], want - taken)
  if type(elements) == 'table' and elements.err then
    if taken == 0 then
      return badkey(KEYS[2 + i], 'list')
    end
    break  -- keep what was taken; the next fetch names the key
  end
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
