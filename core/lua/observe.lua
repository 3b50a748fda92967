-- The metrics hash (core.metrics), and any other counters, summed over one script call:
-- count(field, n), count_in(key, field, n) and observe(name, lane, v) add to tables that
-- flush_metrics() writes at the end, one HINCRBY or HINCRBYFLOAT per key and field. Why: an engine call's moves share their lane and mostly their
-- buckets, so eight jobs' eleven metric commands each become about eleven for the call (a
-- command called from Lua costs Valkey microseconds whatever it does). Prepended to the
-- transition script, after the BUCKETS table core.metrics writes from its HISTOGRAMS.
-- Histogram fields: h|<name>|<lane>|<bucket index> (count) and s|<name>|<lane> (sum).
local counts, sums = {}, {}  -- counts: per hash key, field -> n; sums: metrics field -> v

local function count_in(key, field, n)
  local c = counts[key]
  if not c then c = {}; counts[key] = c end
  c[field] = (c[field] or 0) + n
end

local function count(field, n)
  count_in('{metrics}', field, n)
end

local function observe(name, lane, v)
  if v == nil or v < 0 then return end
  local b = BUCKETS[name]
  local idx = #b
  for j = 1, #b do if v <= b[j] then idx = j - 1; break end end
  count('h|' .. name .. '|' .. lane .. '|' .. idx, 1)
  local s = 's|' .. name .. '|' .. lane
  sums[s] = (sums[s] or 0) + v
end

local function flush_metrics()
  for key, c in pairs(counts) do
    for field, n in pairs(c) do redis.call('HINCRBY', key, field, n) end
  end
  for field, v in pairs(sums) do redis.call('HINCRBYFLOAT', '{metrics}', field, v) end
end
