"""Every Redis key inferq writes, in one namespace.

Each key here is written with a TTL (`Settings.result_ttl_s`) or a MAXLEN; the
comment on each says which.
"""

from __future__ import annotations

PREFIX = "inferq:"


def job(job_id: str) -> str:
    """Hash: the job record, source of truth for status/request/result. TTL: result_ttl_s."""
    return f"{JOB_PREFIX}{job_id}"


def worker(worker_id: str) -> str:
    """String: a worker child's heartbeat with its engine facts; while it exists, the worker
    is alive. TTL: Settings.liveness_s, renewed every heartbeat."""
    return f"{WORKER_PREFIX}{worker_id}"


WORKER_PATTERN = f"{PREFIX}worker:*"


def worker_failure(worker_id: str) -> str:
    """String (JSON `at`, `error`): why a worker child could not load its engine, for
    `inferq run` to print. TTL: 1 hour."""
    return f"{PREFIX}worker-failed:{worker_id}"


WORKER_FAILURE_PATTERN = f"{PREFIX}worker-failed:*"
WORKER_FAILURE_TTL_S = 3600


def job_events(job_id: str) -> str:
    """Stream: status changes and token deltas of one job. MAXLEN ~ and TTL: result_ttl_s."""
    return f"{PREFIX}events:{job_id}"


def cancel(job_id: str) -> str:
    """String flag: the job was asked to stop. TTL: result_ttl_s."""
    return f"{PREFIX}cancel:{job_id}"


def file(file_id: str) -> str:
    """Hash: a file's metadata (bytes live in storage). TTL: file_ttl_s."""
    return f"{PREFIX}file:{file_id}"


def batch(batch_id: str) -> str:
    """Hash: a batch object, its counters and its dispatch cursor. TTL: batch_ttl."""
    return f"{PREFIX}batch:{batch_id}"


def batch_output(batch_id: str) -> str:
    """List: output-file lines as they finish (durable before the file exists). TTL: batch_ttl."""
    return f"{PREFIX}batch:{batch_id}:out"


def batch_errors(batch_id: str) -> str:
    """List: error-file lines as they happen. TTL: batch_ttl."""
    return f"{PREFIX}batch:{batch_id}:err"


def batch_custom_ids(batch_id: str) -> str:
    """Set: custom_ids seen, to refuse duplicates across a dispatcher restart. TTL: batch_ttl."""
    return f"{PREFIX}batch:{batch_id}:ids"


def batch_jobs(batch_id: str) -> str:
    """List: job ids dispatched for the batch (for cancel/expiry). TTL: batch_ttl."""
    return f"{PREFIX}batch:{batch_id}:jobs"


def batch_lock(batch_id: str) -> str:
    """String: the API process dispatching this batch. TTL: a few seconds, renewed."""
    return f"{PREFIX}batch:{batch_id}:lock"


#: Set of batch ids whose dispatch is not finished (resumed on API start). TTL: refreshed.
ACTIVE_BATCHES = f"{PREFIX}batches:active"
#: Sorted set of all batch ids by creation time (for listing). TTL: refreshed.
BATCH_INDEX = f"{PREFIX}batches:index"
#: Sorted set of file ids by creation time (for listing). TTL: refreshed.
FILE_INDEX = f"{PREFIX}files:index"


def ready(lane: str) -> str:
    """List: ids of jobs enqueued on a lane, for a worker to pull more jobs into the batch it
    is about to run (micro-batching). Stale ids are harmless. TTL: result_ttl_s."""
    return f"{READY_PREFIX}{lane}"


#: Key prefixes the Lua scripts in core.job_store build names from (a job's worker is only
#: known inside the script). Same names as the functions below.
JOB_PREFIX = f"{PREFIX}job:"
READY_PREFIX = f"{PREFIX}ready:"
WORKER_PREFIX = f"{PREFIX}worker:"
PROCESSING_PREFIX = f"{PREFIX}processing:"
ACTIVE_PREFIX = f"{PREFIX}active:"


def processing(worker_id: str) -> str:
    """List: the ids of the jobs a worker has taken, off a lane while it fills a batch and
    while it runs them (rq's intermediate queue). Its heartbeat (`worker`) is the one sign
    that it is alive: once that lapses, the reaper puts the queued ids back at the head of
    their lanes and sends the running jobs again. TTL: result_ttl_s, refreshed on every push."""
    return f"{PROCESSING_PREFIX}{worker_id}"


#: List of "job id|lane" entries: running jobs of dead workers, to be sent again; an entry
#: leaves it once its message is sent, so a reaper that dies first loses none. TTL:
#: result_ttl_s, refreshed on every push.
RESEND = f"{PREFIX}resend"

#: Set of the worker ids that have a processing list, for the reaper to look at (no SCAN
#: over every key). TTL: result_ttl_s, refreshed on every add.
PROCESSING_WORKERS = f"{PREFIX}processing-workers"


def api_key(key_hash: str) -> str:
    """String: an API key's record, by the SHA-256 of the key (never the key). TTL: key_ttl_s."""
    return f"{PREFIX}apikey:{key_hash}"


#: Prefix of the `limits` library's keys for the per-key rate limit (api.rate_limit): its
#: moving window, one list per key, expiring after the window (60 s).
RATE_PREFIX = f"{PREFIX}rate"


def idempotency(owner: str, method_path: str, key: str) -> str:
    """String: JSON of an `Idempotency-Key`'s request fingerprint and, once answered, the
    answer (api.idempotency). TTL: a 30 s lease while its request runs, then
    idempotency_ttl_s."""
    return f"{PREFIX}idem:{owner}:{method_path}:{key}"


#: Stream of ended jobs, responses and batches that may have webhook subscribers, written by
#: the transition script and the batch finalizer, read by the API's webhook dispatcher
#: (a consumer group: an API restart loses none). MAXLEN ~ WEBHOOK_EVENTS_MAXLEN.
WEBHOOK_EVENTS = f"{PREFIX}webhook-events"
WEBHOOK_EVENTS_MAXLEN = 100_000


def webhook(endpoint_id: str) -> str:
    """Hash: one webhook endpoint made through the API (url, events, owner, all_keys,
    secret, and during a rotation the old secret and until when it signs; core.webhooks).
    TTL: key_ttl_s (as the API keys it belongs to), refreshed by every delivery it takes."""
    return f"{PREFIX}webhook:{endpoint_id}"


#: Set of webhook endpoint ids (all owners). TTL: key_ttl_s, refreshed on every add and
#: delivery.
WEBHOOK_INDEX = f"{PREFIX}webhooks"

#: String: set while some API process has webhook endpoints by setting (INFERQ_WEBHOOKS).
#: With it or WEBHOOK_INDEX present, the transition script announces ends into
#: WEBHOOK_EVENTS; with neither, nobody could hear of them and it writes nothing.
#: TTL: result_ttl_s, refreshed by every API process with such endpoints every few seconds.
WEBHOOKS_CONFIGURED = f"{PREFIX}webhooks-configured"


def webhook_delivery(delivery_id: str) -> str:
    """Hash: one event to one endpoint (its body, attempts, status, next attempt); the id is
    derived from event and endpoint, so an event read twice adds nothing. TTL: the whole
    retry schedule plus result_ttl_s (core.webhooks.delivery_ttl)."""
    return f"{PREFIX}webhook-delivery:{delivery_id}"


def webhook_deliveries(endpoint_id: str) -> str:
    """Sorted set: an endpoint's delivery ids by creation time (GET .../deliveries).
    TTL: as a delivery's, refreshed; trimmed to the newest 1000."""
    return f"{PREFIX}webhook:{endpoint_id}:deliveries"


#: Sorted set: delivery ids by the time their next attempt is due (the retry schedule,
#: durable across API restarts); a sender leases an id by moving it past the lease
#: (core/lua/webhook_claim.lua). TTL: as a delivery's, refreshed on every add.
WEBHOOK_DUE = f"{PREFIX}webhook-due"


def active(owner: str) -> str:
    """Counter: a key's jobs (and batch lines) not finished yet. TTL: result_ttl_s, refreshed."""
    return f"{ACTIVE_PREFIX}{owner}"


#: Hash of the system's counters and histograms, written by the transition script and the
#: workers, read by GET /metrics (core.metrics names its fields). TTL: result_ttl_s,
#: refreshed on every write (an idle week resets the counters, which Prometheus tolerates).
METRICS = f"{PREFIX}metrics"

#: Sorted set of job ids by creation time (GET /v1/jobs, with keys off); entries older than
#: result_ttl_s are trimmed by one job creation in 32 (core.job_store). TTL: result_ttl_s,
#: refreshed on every add.
JOB_INDEX = f"{PREFIX}jobs:index"


def owner_jobs(owner: str) -> str:
    """Sorted set: one key's job ids by creation time (GET /v1/jobs with keys on). Trimmed
    and TTL as JOB_INDEX."""
    return f"{JOB_INDEX}:{owner}"


#: Hash: the base models workers have announced (model id -> JSON: how the API counts its
#: prompts, its context length, when it was last announced), so that a model whose workers
#: are all gone answers 503 model_unavailable rather than 404, and its batch lines still
#: queue. TTL: result_ttl_s, refreshed on every heartbeat.
MODELS = f"{PREFIX}models"

#: Sorted set of worker ids by the time of their last heartbeat, so readers find the live
#: workers without a SCAN of the keyspace (those older than liveness_s are dropped on read).
#: TTL: refreshed on every beat.
WORKERS = f"{PREFIX}workers"

#: List of the latest failures (JSON: job_id, at, lane, error), newest first, written by the
#: transition script. MAXLEN: FAILURES_MAXLEN (LTRIM); TTL: result_ttl_s, refreshed.
FAILURES = f"{PREFIX}failures"
FAILURES_MAXLEN = 50


#: Hash: LoRA adapters loaded or unloaded on demand (POST /v1/load_lora_adapter, ...): name
#: -> JSON {"path": ...} or {"unloaded": true, "at": ...}, applied by every worker over what
#: its INFERQ_ADAPTERS_DIR holds. An unload ends (its field deleted by a worker) once the
#: directory's entry of that name appears or changes, and when a worker starts.
#: TTL: none needed beyond result_ttl_s, refreshed on every write.
ADAPTER_OVERRIDES = f"{PREFIX}adapters:overrides"

#: Hash: why a worker refused an adapter (name -> JSON reason, worker, version), for the load
#: endpoint to answer with. TTL: result_ttl_s, refreshed on every write.
ADAPTER_REFUSALS = f"{PREFIX}adapters:refusals"

#: String: written just before a WAIT, on the WAIT's own connection, so that the WAIT covers
#: every earlier write of the process (core.redis_conn.wait_replicas). TTL: 60 s.
REPLICATION_FENCE = f"{PREFIX}replication-fence"
