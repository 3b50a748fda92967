-- pop: take up to `count` ids off the ready lists, lanes in priority order (what the first
-- lane lacks is taken from the next), into the worker's processing list, in one step: an id
-- is never only in the memory of a process that can die (a popped id may be the only way to
-- a queued job whose message a dead worker parent held). One call for every lane: a worker
-- filling an engine call used to send one per lane, empty or not (`inferq bench fleet`).
-- Only ids of queued jobs are kept: an id whose job ended, is running (a duplicate) or is
-- gone is dropped on the way, as every taker would drop it. Each kept job's record comes
-- back with it: the taker reads them anyway, and here that costs no round trip.
-- KEYS[1]     processing list of the worker (list of job ids)
-- KEYS[2]     PROCESSING_WORKERS (set of workers that have a processing list)
-- KEYS[3..n]  the ready list of each lane to look at, in priority order
-- ARGV[1]     count: ids to take at most, from all lanes together
-- ARGV[2]     ttl: seconds, for the keys written
-- ARGV[3]     worker: this worker's id (host:pid)
-- Returns one list per lane (KEYS[3..n], in order): for each job taken from it, its id and
-- its record (HGETALL's field, value list), one after the other.
local want = tonumber(ARGV[1])
local taken = {}
for i = 3, #KEYS do
  local ids = false
  if want > 0 then ids = redis.call('LPOP', KEYS[i], want) end
  if ids then
    want = want - #ids
    local queued, records = {}, {}
    for _, id in ipairs(ids) do
      local record = redis.call('HGETALL', '{job}' .. id)
      for f = 1, #record, 2 do
        if record[f] == 'status' then
          if record[f + 1] == 'queued' then
            queued[#queued + 1] = id
            records[#records + 1] = id
            records[#records + 1] = record
          end
          break
        end
      end
    end
    for j = 1, #queued, 1000 do  -- unpack is bounded by Lua's stack
      redis.call('RPUSH', KEYS[1], unpack(queued, j, math.min(j + 999, #queued)))
    end
    taken[#taken + 1] = records
  else
    taken[#taken + 1] = {}
  end
end
if want < tonumber(ARGV[1]) then  -- a list written, or at least one id dropped
  redis.call('EXPIRE', KEYS[1], ARGV[2])
  redis.call('SADD', KEYS[2], ARGV[3])
  redis.call('EXPIRE', KEYS[2], ARGV[2])
end
return taken
