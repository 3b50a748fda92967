-- xadd_tokens: token events of many jobs in one command. Why a script and not a pipeline
-- of XADDs: on a GPU a flush comes every generation step, and redis-py spent more CPU
-- packing 32 XADDs of 14 arguments each than the step's decoding, in the thread that drives
-- the GPU. NOMKSTREAM and no EXPIRE: the stream was made with the job and its TTL is
-- renewed by every status change; a stream gone with its job is not re-created without one.
-- Fenced as the transition script is: a job whose record counts another attempt than the
-- writer's runs again elsewhere (this writer was cut off past its heartbeat), so the late
-- writer's tokens are dropped and readers never see two attempts' text interleaved.
-- KEYS[2i-1]  per job i: its event stream
-- KEYS[2i]    per job i: its record (hash), for its current attempt
-- ARGV[1]     maxlen: the streams' approximate cap
-- ARGV[2..]   per job i, three entries from 2 + (i - 1) * 3: choice index, text, attempt
-- Returns the number of events written.
local written = 0
for i = 1, #KEYS / 2 do
  local a = 2 + (i - 1) * 3
  if redis.call('HGET', KEYS[2 * i], 'attempts') == ARGV[a + 2] then
    redis.call('XADD', KEYS[2 * i - 1], 'NOMKSTREAM', 'MAXLEN', '~', ARGV[1], '*',
      'type', 'token', 'index', ARGV[a], 'text', ARGV[a + 1], 'attempt', ARGV[a + 2])
    written = written + 1
  end
end
return written
