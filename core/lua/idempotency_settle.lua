-- idempotency_settle: an Idempotency-Key's request has ended: keep its answer, or free the
-- key so that a retry runs again (api.idempotency). Only the request that claimed the key
-- may do either: a claim whose lease ran out and was taken by another request is left alone.
-- KEYS[1]  the key's record (string: JSON of the claim, then of the answer)
-- ARGV[1]  claim: the record as this request wrote it when it claimed the key
-- ARGV[2]  answer: the record to keep ('' frees the key)
-- ARGV[3]  ttl: seconds the answer is kept
-- Returns 1 when settled, 0 when the key was no longer this request's.
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if ARGV[2] == '' then redis.call('DEL', KEYS[1])
else redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3]) end
return 1
