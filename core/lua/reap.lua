-- reap: a worker whose heartbeat lapsed (or, own = '1', a live one settling its own list
-- between tasks). Its queued ids go back to the head of their lanes in order; the jobs it
-- was running stop being its (`worker` cleared, so a new message may run them) and go to
-- the durable RESEND list, from which they are sent again and removed only once sent. A
-- settled job's attempt is given back: its worker did not die. Nothing if the heartbeat is
-- back. One call, so two reapers never both take a list.
-- KEYS[1]  processing list of the worker
-- KEYS[2]  PROCESSING_WORKERS (set)
-- KEYS[3]  the worker's heartbeat key
-- KEYS[4]  RESEND (list of "<job id>|<lane>")
-- ARGV[1]  worker: the worker's id
-- ARGV[2]  ttl: seconds, for the keys written
-- ARGV[3]  own: '1' when the worker settles its own list (alive), else '0'
-- Returns how many running jobs went to RESEND.
if ARGV[3] ~= '1' and redis.call('EXISTS', KEYS[3]) == 1 then return 0 end
local ids = redis.call('LRANGE', KEYS[1], 0, -1)
local moved = 0
for i = #ids, 1, -1 do
  local job = '{job}' .. ids[i]
  local f = redis.call('HMGET', job, 'status', 'queue', 'worker')
  if f[1] == 'queued' and f[2] then
    redis.call('LPUSH', '{ready}' .. f[2], ids[i])
    redis.call('EXPIRE', '{ready}' .. f[2], ARGV[2])
  elseif f[1] == 'running' and f[3] == ARGV[1] then
    redis.call('HSET', job, 'worker', '')
    if ARGV[3] == '1' then redis.call('HINCRBY', job, 'attempts', -1) end
    redis.call('RPUSH', KEYS[4], ids[i] .. '|' .. (f[2] or ''))
    redis.call('EXPIRE', KEYS[4], ARGV[2])
    moved = moved + 1
  end
end
redis.call('DEL', KEYS[1])
redis.call('SREM', KEYS[2], ARGV[1])
return moved
