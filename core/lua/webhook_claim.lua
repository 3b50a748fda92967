-- webhook_claim: takes the webhook deliveries whose next attempt is due, and leases each by
-- moving its due time past the lease: two API processes never send the same attempt, and
-- one that dies mid-send leaves the delivery due again once the lease runs out.
-- KEYS[1]  due: sorted set of delivery ids by the time their next attempt is due
-- ARGV[1]  now: Unix time in seconds (fractional)
-- ARGV[2]  lease: seconds a taken delivery stays out of reach of other senders
-- ARGV[3]  limit: the most ids taken
-- Returns the ids taken, the earliest due first.
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
local until_at = tonumber(ARGV[1]) + tonumber(ARGV[2])
for _, id in ipairs(ids) do
  redis.call('ZADD', KEYS[1], until_at, id)
end
return ids
