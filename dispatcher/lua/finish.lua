--[[ finish.lua: record the outcomes of tasks one dispatcher ran and give their slots back.

One call takes a batch, so a busy dispatcher pays one round trip for many outcomes. An item
whose slot is no longer in flight is skipped whole: its outcome was already recorded (a retried
call after a lost reply) or recovery already put the task back on its list, so writing it again
would duplicate it. The in-flight entry is the lease; no lease, no write.

KEYS[1]   in-flight hash of this dispatcher
KEYS[2]   tokens list of this dispatcher
KEYS[3]   the wake list: a retry pushes it so idle dispatchers learn of the new due time
KEYS[4]   this dispatcher's heartbeat
ARGV[2]   this process's instance: if another process holds the id now, answer "LOSTID <its
          heartbeat>" and write nothing (its slots are that process's now)
ARGV[1]   msgpack array of maps, each with "slot" and "action":
  (none)                                          task done, nobody asked for its outcome: the
                                                  common case, so its map holds the slot alone
  ack      result_key, reply_to, reply, ttl      task done; reply is written where asked
  retry    schedule_key, due (ms), payload        task failed and will run again at due
  dead     dead_list, dead_key, fields (map), payload (optional; default the in-flight
           element), result_key, reply_to, reply, ttl
  requeue                                          put the element back at the head of its list
  result_key / reply_to are "" when nobody asked for the outcome. An item with a reply_to also
  has keep_key: where the outcome is kept if reply_to refuses it.
Returns {number of items applied, then slot, error for each reply_to that refused its outcome}.
]]
local refused = {}

-- reply_to is the producer's key: it may hold another type (or, on Cluster, hash to another
-- slot). A refusal must not abort the script (the batch's other outcomes) nor lose this one:
-- the outcome goes to keep_key instead, and the caller is told.
local function reply(item)
  local keep = item.result_key
  if item.reply_to ~= '' then
    local pushed = redis.pcall('LPUSH', item.reply_to, item.reply)
    if type(pushed) == 'table' and pushed.err then
      refused[#refused + 1] = item.slot
      refused[#refused + 1] = pushed.err
      keep = item.keep_key
    else
      redis.call('EXPIRE', item.reply_to, item.ttl)
    end
  end
  if keep ~= '' then
    redis.call('DEL', keep)
    redis.call('RPUSH', keep, item.reply)
    redis.call('EXPIRE', keep, item.ttl)
  end
end

-- The lease checks are one HGET per item; the leases are dropped and the tokens given back in
-- one HDEL and one LPUSH per batch (per-item calls were most of the server's time per task).
-- Before an item writes anything else, release() runs: a write that fails (Redis out of
-- memory, say) aborts the script, and Redis keeps what the script wrote before the
-- error, so every lease of an item whose outcome is written must already be gone, or a retry
-- would write that outcome again.
local done_fields, done_slots = {}, {}
local function release()
  if #done_slots > 0 then
    redis.call('HDEL', KEYS[1], unpack(done_fields))
    redis.call('LPUSH', KEYS[2], unpack(done_slots))
    done_fields, done_slots = {}, {}
  end
end

local owner = redis.call('GET', KEYS[4])
if owner and not string.find(owner, ARGV[2], 1, true) then
  return redis.error_reply('LOSTID ' .. owner)
end

local items = cmsgpack.unpack(ARGV[1])

-- The keys an outcome is written to after its lease is dropped (release()) must hold the
-- right type, or the task is lost: check them all before anything is written.
local function check(key, want)
  local kind = redis.call('TYPE', key).ok
  if kind ~= want and kind ~= 'none' then
    return 'BADKEY ' .. key .. ' holds a ' .. kind .. ', not a ' .. want
  end
end
for _, item in ipairs(items) do
  local bad
  if item.action == 'retry' then
    bad = check(item.schedule_key, 'zset') or check(KEYS[3], 'list')
  elseif item.action == 'dead' then
    bad = check(item.dead_list, 'list') or check(item.dead_key, 'hash')
  elseif item.action == 'requeue' then
    local source = redis.call('HGET', KEYS[1], tostring(item.slot) .. ':q')
    bad = source and check(source, 'list')
  end
  if bad then
    return redis.error_reply(bad)
  end
end
local applied = 0
local seen = {}
for _, item in ipairs(items) do
  local slot = tostring(item.slot)
  local element = not seen[slot] and redis.call('HGET', KEYS[1], slot)
  if element then
    seen[slot] = true
    done_fields[#done_fields + 1] = slot
    done_fields[#done_fields + 1] = slot .. ':q'
    done_slots[#done_slots + 1] = slot
    local source = nil
    if item.action and (item.action ~= 'ack' or item.result_key ~= '' or item.reply_to ~= '') then
      source = redis.call('HGET', KEYS[1], slot .. ':q')
      release()
    end
    if not item.action then
      -- plain ack: the lease and the token are all there is to it
    elseif item.action == 'ack' then
      reply(item)
    elseif item.action == 'retry' then
      redis.call('ZADD', item.schedule_key, item.due, item.payload)
      redis.call('LPUSH', KEYS[3], 1)
      redis.call('LTRIM', KEYS[3], 0, 0)
    elseif item.action == 'dead' then
      local fields = {'payload', item.payload or element, 'queue', source}
      for name, value in pairs(item.fields) do
        fields[#fields + 1] = name
        fields[#fields + 1] = value
      end
      redis.call('HSET', item.dead_key, unpack(fields))
      redis.call('LPUSH', item.dead_list, item.dead_id)
      reply(item)
    elseif item.action == 'requeue' then
      redis.call('RPUSH', source, element)
    end
    applied = applied + 1
    if #done_slots >= 2000 then  -- unpack() takes at most ~8000 values
      release()
    end
  end
end
release()
return {applied, unpack(refused)}
