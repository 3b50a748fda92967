-- pop: take up to `count` ids off the first non-empty ready list (lanes in priority order)
-- into the worker's processing list, in one step: an id is never only in the memory of a
-- process that can die (a popped id may be the only way to a queued job whose message a
-- dead worker parent held until the visibility timeout).
-- KEYS[1]     processing list of the worker (list of job ids)
-- KEYS[2]     PROCESSING_WORKERS (set of workers that have a processing list)
-- KEYS[3..n]  the ready list of each lane to look at, in priority order
-- ARGV[1]     count: ids to take at most
-- ARGV[2]     ttl: seconds, for the keys written
-- ARGV[3]     worker: this worker's id (host:pid)
-- Returns the ids taken (empty: every lane was empty).
for i = 3, #KEYS do
  local ids = redis.call('LPOP', KEYS[i], tonumber(ARGV[1]))
  if ids then
    for j = 1, #ids, 1000 do  -- unpack is bounded by Lua's stack
      redis.call('RPUSH', KEYS[1], unpack(ids, j, math.min(j + 999, #ids)))
    end
    redis.call('EXPIRE', KEYS[1], ARGV[2])
    redis.call('SADD', KEYS[2], ARGV[3])
    redis.call('EXPIRE', KEYS[2], ARGV[2])
    return ids
  end
end
return {}
