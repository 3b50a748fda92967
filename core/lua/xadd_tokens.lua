-- xadd_tokens: token events of many jobs in one command. Why a script and not a pipeline
-- of XADDs: on a GPU a flush comes every generation step, and redis-py spent more CPU
-- packing 32 XADDs of 14 arguments each than the step's decoding, in the thread that drives
-- the GPU. NOMKSTREAM and no EXPIRE: the stream was made with the job and its TTL is
-- renewed by every status change; a stream gone with its job is not re-created without one.
-- KEYS[1..n]  the event stream of each job
-- ARGV[1]     maxlen: the streams' approximate cap
-- ARGV[2..]   per key i, three entries from 2 + (i - 1) * 3: choice index, text, attempt
-- Returns the number of events written.
for i, key in ipairs(KEYS) do
  local a = 2 + (i - 1) * 3
  redis.call('XADD', key, 'NOMKSTREAM', 'MAXLEN', '~', ARGV[1], '*',
    'type', 'token', 'index', ARGV[a], 'text', ARGV[a + 1], 'attempt', ARGV[a + 2])
end
return #KEYS
