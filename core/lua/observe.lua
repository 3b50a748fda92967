-- observe(name, lane, v): one sample into a histogram of the metrics hash (core.metrics).
-- Prepended to the transition script, after the BUCKETS table core.metrics writes from its
-- HISTOGRAMS. Fields: h|<name>|<lane>|<bucket index> (count) and s|<name>|<lane> (sum).
local function observe(name, lane, v)
  if v == nil or v < 0 then return end
  local b = BUCKETS[name]
  local idx = #b
  for j = 1, #b do if v <= b[j] then idx = j - 1; break end end
  redis.call('HINCRBY', '{metrics}', 'h|' .. name .. '|' .. lane .. '|' .. idx, 1)
  redis.call('HINCRBYFLOAT', '{metrics}', 's|' .. name .. '|' .. lane, v)
end
