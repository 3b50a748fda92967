-- tidy: a worker's processing list once it has filled an engine call. What it runs stays;
-- its queued ids (looked at and left, or never looked at because something failed) go
-- back to the head of their lanes, in order; the rest (finished, taken by another worker)
-- leave the list.
-- KEYS[1]  processing list of the worker
-- ARGV[1]  worker: this worker's id
-- ARGV[2]  ttl: seconds, for the ready lists written
-- Returns how many ids the list held.
local ids = redis.call('LRANGE', KEYS[1], 0, -1)
for i = #ids, 1, -1 do
  local f = redis.call('HMGET', '{job}' .. ids[i], 'status', 'worker', 'queue')
  if f[1] ~= 'running' or f[2] ~= ARGV[1] then
    redis.call('LREM', KEYS[1], 0, ids[i])
    if f[1] == 'queued' and f[3] then
      redis.call('LPUSH', '{ready}' .. f[3], ids[i])
      redis.call('EXPIRE', '{ready}' .. f[3], ARGV[2])
    end
  end
end
return #ids
