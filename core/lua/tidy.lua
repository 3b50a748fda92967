-- tidy: a worker's processing list once it has filled an engine call. What it runs stays;
-- its queued ids (looked at and left, or never looked at because something failed) go
-- back to the head of their lanes, in order; the rest (finished, taken by another worker)
-- leave the list. The list is written again whole and each lane gets its ids back in one
-- LPUSH: per id, an LREM (a scan of the list), an LPUSH and an EXPIRE cost three calls.
-- KEYS[1]  processing list of the worker
-- ARGV[1]  worker: this worker's id
-- ARGV[2]  ttl: seconds, for the ready lists and the list written
-- Returns how many ids the list held.
local ids = redis.call('LRANGE', KEYS[1], 0, -1)
local keep, back, lanes = {}, {}, {}
for i = 1, #ids do
  local f = redis.call('HMGET', '{job}' .. ids[i], 'status', 'worker', 'queue')
  if f[1] == 'running' and f[2] == ARGV[1] then
    keep[#keep + 1] = ids[i]
  elseif f[1] == 'queued' and f[3] then
    if not back[f[3]] then
      back[f[3]] = {}
      lanes[#lanes + 1] = f[3]
    end
    table.insert(back[f[3]], 1, ids[i])  -- reversed: LPUSH puts the last argument first
  end
end
for _, lane in ipairs(lanes) do
  local list = back[lane]
  for j = 1, #list, 1000 do  -- unpack is bounded by Lua's stack
    redis.call('LPUSH', '{ready}' .. lane, unpack(list, j, math.min(j + 999, #list)))
  end
  redis.call('EXPIRE', '{ready}' .. lane, ARGV[2])
end
if #keep < #ids then
  redis.call('DEL', KEYS[1])
  for j = 1, #keep, 1000 do
    redis.call('RPUSH', KEYS[1], unpack(keep, j, math.min(j + 999, #keep)))
  end
  if #keep > 0 then redis.call('EXPIRE', KEYS[1], ARGV[2]) end
end
return #ids
