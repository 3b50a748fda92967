-- pop: take up to `count` ids off the ready lists, lanes in priority order (what the first
-- lane lacks is taken from the next), into the worker's processing list, in one step: an id
-- is never only in the memory of a process that can die (a popped id may be the only way to
-- a queued job whose message a dead worker parent held). One call for every lane: a worker
-- filling an engine call used to send one per lane, empty or not (`inferq bench fleet`).
-- KEYS[1]     processing list of the worker (list of job ids)
-- KEYS[2]     PROCESSING_WORKERS (set of workers that have a processing list)
-- KEYS[3..n]  the ready list of each lane to look at, in priority order
-- ARGV[1]     count: ids to take at most, from all lanes together
-- ARGV[2]     ttl: seconds, for the keys written
-- ARGV[3]     worker: this worker's id (host:pid)
-- Returns one list per lane (KEYS[3..n], in order): the ids taken from it.
local want = tonumber(ARGV[1])
local taken = {}
for i = 3, #KEYS do
  local ids = false
  if want > 0 then ids = redis.call('LPOP', KEYS[i], want) end
  if ids then
    want = want - #ids
    for j = 1, #ids, 1000 do  -- unpack is bounded by Lua's stack
      redis.call('RPUSH', KEYS[1], unpack(ids, j, math.min(j + 999, #ids)))
    end
    taken[#taken + 1] = ids
  else
    taken[#taken + 1] = {}
  end
end
if want < tonumber(ARGV[1]) then
  redis.call('EXPIRE', KEYS[1], ARGV[2])
  redis.call('SADD', KEYS[2], ARGV[3])
  redis.call('EXPIRE', KEYS[2], ARGV[2])
end
return taken
