-- transition: moves of jobs' state machines (schemas.jobs.TRANSITIONS), each atomic, all
-- of one engine call in one script call.
-- Why one script: the status check and the write are one step, so a redelivered task can
-- never overwrite a finished result and a cancel racing a finish has exactly one winner;
-- the events, metrics, processing lists and batch counters move in the same step, so none
-- of them can disagree with the record. Why many moves in one call: each script call costs
-- Valkey its set-up whatever it does, and an engine call's moves share their metrics
-- (summed, core/lua/observe.lua). Each part below is one idea; `move` calls them in order.
-- ARGV[1]  n: the number of moves
-- ARGV[2 .. 2n+1]  per move: how many keys, how many args it has
-- KEYS[1 ..]  each move's keys in turn; ARGV[2n+2 ..] each move's args in turn
-- A move's keys (K below):
--   K[1]  job: the job record (hash)
--   K[2]  events: the job's event stream
--   K[3]  PROCESSING_WORKERS (set of workers that have a processing list)
--   K[4]  a batch line's output lines (list)  } only when the job is a line of an
--   K[5]  a batch line's error lines (list)   } OpenAI Batch that this move ends
--   K[6]  the batch record (hash)             }
-- A move's args (A below):
--   A[1]  to: the new status
--   A[2]  now: Unix time, seconds
--   A[3]  ttl: seconds, for every key written
--   A[4]  from: the statuses the move may start from, comma-separated
--   A[5]  ends: '1' when `to` is terminal
--   A[6 .. #A-1]  field, value pairs: record fields to write; a field whose name starts
--          with '_' is a fact for this script only (_worker, _attempt, _first_token_at,
--          _prompt_tokens, _completion_tokens, and a batch line's _line, _list, _count,
--          _ttl, _in, _out: core.job_store.BatchLine)
--   A[#A]  maxlen: the event stream's approximate cap
-- Returns one reply per move: {'missing', ''}, {'conflict', status}, {'alive', status},
-- {'fenced', status} (refused), {'ok', status} (status: the one before), or, when the move
-- ended the job, {'ok', status, lane, created, started, attempts, owner, model, batch_id}
-- (what its audit line needs, core.audit).

-- The move under way: its keys and args, and what the parts below share of it. Set by
-- `move` (chunk-level, so the parts are made once per script call, not once per move).
local K, A = nil, nil
local job, events, to, now, ttl, maxlen, id
local rec, writes = nil, nil  -- the record's fields read; field, value pairs for the one HSET
local expired = {}  -- batch output lists given their TTL in this script call

-- Why one read and one write of the record: a command called from Lua costs Valkey a few
-- microseconds whatever it does, and two moves a job ran ~24 of them each (11 HGETs, 7
-- HSETs a job); the record's fields are read once here and written once at the end.
local READ = {'status', 'worker', 'queue', 'created_at', 'attempts', 'started_at', 'owner', 'model',
              'batch_id', 'notify'}
local function put(field, value)
  writes[#writes + 1] = field
  writes[#writes + 1] = value
end

-- The fencing token a worker's move carries: the attempt it runs (its `_attempt` fact), or
-- nil for a move that is not a worker's (the API's cancel, an expiry).
local function fencing_token()
  for i = 6, #A - 1, 2 do
    if A[i] == '_attempt' then return A[i + 1] end
  end
  return nil
end

-- Refusal: why the move may not happen now (nil: it may). A job whose worker is alive (its
-- heartbeat stands) is being run: it is never run twice. A worker cut off from Redis longer
-- than its heartbeat lasts has had its job run again elsewhere (a later attempt): whatever it
-- sends once it is back is refused (fenced), so the job changes only by its current attempt.
local function refusal(cur, worker)
  if not cur then return {'missing', ''} end
  local allowed = false
  for s in string.gmatch(A[4], '[^,]+') do if s == cur then allowed = true end end
  if not allowed then return {'conflict', cur} end
  if to == 'running' and cur == 'running' and worker and redis.call('EXISTS', '{worker}' .. worker) == 1 then
    return {'alive', cur}
  end
  local token = fencing_token()
  if token and cur == 'running' and token ~= (rec.attempts or '0') then
    return {'fenced', cur}
  end
  return nil
end

-- The move's fields: record fields are written, '_' facts only returned.
local function write_fields()
  local facts = {}
  for i = 6, #A - 1, 2 do
    if string.sub(A[i], 1, 1) ~= '_' then put(A[i], A[i + 1]) end
    facts[A[i]] = A[i + 1]
  end
  return facts
end

-- Processing lists (core.recovery): a job that ended, or that a new worker runs, leaves
-- its old worker's list; a started job is in its worker's list until it ends.
local function hand_over(worker, new_worker)
  if worker and worker ~= new_worker then redis.call('LREM', '{processing}' .. worker, 0, id) end
end

-- A job the worker took off a lane is in its list already (core/lua/pop.lua wrote the list,
-- its TTL and the worker's membership of KEYS[3] together, and they leave together): only a
-- job started from its own message is added here.
local function claim(new_worker)
  local mine = '{processing}' .. (new_worker or '')
  put('worker', new_worker or '')
  if not redis.call('LPOS', mine, id) then
    redis.call('RPUSH', mine, id)
    redis.call('EXPIRE', mine, ttl)
    redis.call('SADD', K[3], new_worker)
    redis.call('EXPIRE', K[3], ttl)
  end
end

-- Attempts: a start counts one; a second start is a redelivery, whose subscribers drop
-- the partial text of the attempt that died.
local function start_attempt(lane, created, facts)
  local attempt = tonumber(rec.attempts or '0') + 1
  rec.attempts = tostring(attempt)
  put('attempts', rec.attempts)
  if attempt == 1 then observe('queue_wait', lane, now - created) end
  put('started_at', A[2])
  claim(facts['_worker'])
  if attempt > 1 then
    redis.call('XADD', events, 'MAXLEN', '~', maxlen, '*', 'type', 'reset', 'attempt', rec.attempts)
  end
end

-- Webhooks (api.webhooks): a job that asked to be announced (its `notify` field: 'job' or
-- 'response') is put in the webhook event stream as it ends, in the same step, so no end
-- goes unannounced whichever process ended it. With no endpoint anywhere (none made through
-- the API, none by setting) nobody could hear of it: nothing is written, and the API's
-- dispatcher reads nothing (two round trips a job saved, `inferq bench fleet`).
local function notify(kind, owner)
  if redis.call('EXISTS', '{webhook_index}', '{webhooks_configured}') == 0 then return end
  redis.call('XADD', '{webhook_events}', 'MAXLEN', '~', '{webhook_events_maxlen}', '*',
    'kind', kind, 'id', id, 'status', to, 'owner', owner or '', 'at', A[2])
  redis.call('EXPIRE', '{webhook_events}', ttl)
end

-- Metrics of an ended job (core.metrics), and its key's active count (api.auth); returns
-- the facts read for them, which the audit line needs too.
local function count_end(cur, lane, created, facts)
  put('finished_at', A[2])
  local ended = {rec.started_at, rec.owner, rec.model, rec.batch_id}
  local started, owner = ended[1], ended[2]
  if rec.notify and rec.notify ~= '' then notify(rec.notify, owner) end
  if owner and owner ~= '' then redis.call('DECR', '{active}' .. owner) end
  count('finished|' .. lane .. '|' .. to, 1)
  count('model_jobs|' .. (ended[3] or ''), 1)
  if started and cur == 'running' then observe('run', lane, now - tonumber(started)) end
  if facts['_first_token_at'] then observe('ttft', lane, tonumber(facts['_first_token_at']) - created) end
  if facts['_prompt_tokens'] then
    count('prompt_tokens|' .. lane, tonumber(facts['_prompt_tokens']))
    count('generated_tokens|' .. lane, tonumber(facts['_completion_tokens'] or 0))
  end
  return ended
end

-- The latest failures, for /status and `inferq top` (capped list).
local function record_failure(lane, facts)
  local failure = {job_id = id, at = now, lane = lane, error = facts['error'] or ''}
  redis.call('LPUSH', '{failures}', cjson.encode(failure))
  redis.call('LTRIM', '{failures}', 0, {failures_maxlen} - 1)
  redis.call('EXPIRE', '{failures}', ttl)
end

-- Events: the status change, then what the new status carries (result, error).
local function append_events(attempts, lane, facts)
  redis.call('XADD', events, 'MAXLEN', '~', maxlen, '*', 'type', 'status', 'status', to, 'attempt', attempts)
  if to == 'succeeded' then
    redis.call('XADD', events, 'MAXLEN', '~', maxlen, '*', 'type', 'done', 'result', facts['result'] or '')
  elseif to == 'failed' then
    redis.call('XADD', events, 'MAXLEN', '~', maxlen, '*', 'type', 'error', 'error', facts['error'] or '')
    record_failure(lane, facts)
  elseif to == 'cancelled' then
    redis.call('XADD', events, 'MAXLEN', '~', maxlen, '*', 'type', 'cancelled', 'result', facts['result'] or '')
  end
  redis.call('EXPIRE', events, ttl)
end

-- A batch line: its output or error line and the batch's counters move with the job (the
-- counters summed over the call with the metrics; a call's lines share their batch, and
-- their list's EXPIRE is sent once).
local function write_batch_line(facts)
  if not facts['_line'] or #K < 6 then return end
  local list = K[5]
  if facts['_list'] == 'out' then list = K[4] end
  redis.call('RPUSH', list, facts['_line'])
  if not expired[list] then
    redis.call('EXPIRE', list, facts['_ttl'])
    expired[list] = true
  end
  count_in(K[6], 'done_lines', 1)
  if facts['_count'] ~= '' then count_in(K[6], facts['_count'], 1) end
  count_in(K[6], 'input_tokens', tonumber(facts['_in'] or 0))
  count_in(K[6], 'output_tokens', tonumber(facts['_out'] or 0))
end

-- One move: check, write, then each part in order. The metrics hash gets no EXPIRE here:
-- every job's creation refreshes it (core.metrics.count_queued), and two calls a job are saved.
local function move(keys, args)
  K, A = keys, args
  job, events = K[1], K[2]
  to, now, ttl, maxlen = A[1], tonumber(A[2]), A[3], A[#A]
  id = string.sub(job, string.len('{job}') + 1)
  rec, writes = {}, {}
  local values = redis.call('HMGET', job, unpack(READ))
  for i, field in ipairs(READ) do rec[field] = values[i] or nil end
  local cur, worker = rec.status, rec.worker
  local refused = refusal(cur, worker)
  if refused then return refused end
  put('status', to)
  local lane = rec.queue or ''
  local created = tonumber(rec.created_at or A[2])
  if cur == 'queued' then count('depth|' .. lane, -1) end
  local facts = write_fields()
  hand_over(worker, facts['_worker'])
  local ended = nil
  if to == 'running' then
    start_attempt(lane, created, facts)
  elseif A[5] == '1' then
    ended = count_end(cur, lane, created, facts)
  end
  redis.call('HSET', job, unpack(writes))
  redis.call('EXPIRE', job, ttl)
  local attempts = rec.attempts or '0'
  append_events(attempts, lane, facts)
  write_batch_line(facts)
  if ended then
    return {'ok', cur, lane, tostring(created), ended[1] or '', attempts, ended[2] or '', ended[3] or '',
            ended[4] or ''}
  end
  return {'ok', cur}
end

-- Main: each move with its own keys and args, then the metrics they add up to.
local n = tonumber(ARGV[1])
local replies = {}
local next_key, next_arg = 1, 2 * n + 2
for m = 1, n do
  local nkeys, nargs = tonumber(ARGV[2 * m]), tonumber(ARGV[2 * m + 1])
  local keys, args = {}, {}
  for j = 1, nkeys do keys[j] = KEYS[next_key + j - 1] end
  for j = 1, nargs do args[j] = ARGV[next_arg + j - 1] end
  next_key, next_arg = next_key + nkeys, next_arg + nargs
  replies[m] = move(keys, args)
end
flush_metrics()
return replies
