"""The one settings object, read from the environment (prefix ``INFERQ_``).

Why one object: the API, the Celery config, the worker child and the CLI must agree on
the broker, the model and the limits; reading env in one place keeps them from drifting.
"""

from __future__ import annotations

from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from core import lanes
from schemas.webhooks import EVENT_TYPES


class WebhookSetting(BaseModel):
    """One INFERQ_WEBHOOKS entry, checked when the settings are read: a typo in the setting
    stops the process at start instead of leaving the endpoint silently deaf."""

    model_config = ConfigDict(extra="forbid")

    url: str = Field(pattern=r"^https?://")
    secret: str = Field(pattern=r"^whsec_[A-Za-z0-9+/=]{16,}$")
    #: empty: every event type
    events: list[str] = Field(default_factory=list)

    @field_validator("events")
    @classmethod
    def _known(cls, v: list[str]) -> list[str]:
        unknown = [e for e in v if e not in EVENT_TYPES]
        if unknown:
            raise ValueError(f"unknown event type {unknown[0]!r}; known: {', '.join(EVENT_TYPES)}")
        return v


def _default_home() -> Path:
    return Path.home() / ".cache" / "inferq"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="INFERQ_", extra="ignore")

    # --- broker / state store -------------------------------------------------
    #: Redis/Valkey URL. Empty means "not configured": `inferq run` then starts an
    #: embedded Valkey and passes its URL on to every process it starts.
    redis_url: str = Field(default="", validation_alias=AliasChoices("INFERQ_REDIS_URL", "REDIS_URL"))
    #: Seconds a Redis call may take in the API before it answers 503 instead of hanging.
    redis_timeout_s: float = 5.0
    #: With a `sentinel://` URL (Celery's form, `sentinel://[:password@]h1:26379[/db];sentinel://h2:26379`):
    #: the name the sentinels monitor the primary under (`sentinel monitor NAME ...`).
    redis_sentinel_master: str = "mymaster"
    #: Replicas that must hold a new job (or batch) before the API answers 202 (Redis WAIT,
    #: for up to half of redis_timeout_s; 503 if fewer did). 0: off. Replication is
    #: asynchronous, so without it a job accepted just before the primary dies can be
    #: missing on the replica promoted in its place (docs/reliability.md).
    redis_wait_replicas: int = Field(default=0, ge=0)
    #: Seconds a finished (or queued) job record, its result and its stream are kept.
    result_ttl_s: int = 24 * 3600
    #: Longest XREAD BLOCK of an SSE reader; an idle stream gets a keep-alive this often.
    sse_block_s: float = 15.0

    # --- model ------------------------------------------------------------------
    #: `swift` serves a real ms-swift engine; `echo` answers with the prompt (plumbing
    #: tests and the queue-floor benchmark only).
    engine: Literal["swift", "echo"] = "swift"
    #: Local model directory. Empty: the tiny random demo model is built and served.
    model_path: str = ""
    model_type: str = ""
    template: str = ""
    #: LoRA adapter directories merged into the served model at load time.
    adapters: list[str] = Field(default_factory=list)
    #: Every subdirectory holding a PEFT LoRA adapter is served under its name as a `model`,
    #: beside the base model, and the directory is watched: adapters dropped in, changed or
    #: removed are served, reloaded or dropped without a restart. Static engine mode only.
    adapters_dir: Path | None = None
    #: At most this many adapters in a worker's memory at once (0: every served one); the
    #: least recently used is unloaded to make room, and loaded again when a job needs it.
    max_loaded_adapters: int = Field(default=0, ge=0)
    #: The `model` id clients send; defaults to the model directory's name.
    served_model_name: str = ""
    torch_dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    device_map: str = "auto"
    max_batch_size: int = Field(default=8, ge=1, le=1024)
    #: How a worker child batches. `static`: up to MAX_BATCH_SIZE jobs in one `generate` call
    #: that runs until its longest row ends. `continuous`: transformers' continuous batching
    #: (a persistent generation loop, paged attention): a job joins the running batch at once
    #: and a finished row frees its slot at once, up to MAX_BATCH_SIZE rows at a time. Which
    #: is faster depends on the hardware and the spread of output lengths: measure
    #: (`inferq bench engines`, docs/benchmarks.md); static is the default.
    engine_mode: Literal["static", "continuous"] = "static"
    #: Continuous mode: KV-cache pages (0: transformers sizes it from free GPU memory; on a
    #: CPU, enough for MAX_BATCH_SIZE rows of the context length) and tokens per page.
    kv_cache_blocks: int = Field(default=0, ge=0)
    kv_page_size: int = Field(default=0, ge=0)
    #: torch's CPU threads in a worker child; 0 = torch's default (every core). Why not one
    #: core left to the API and Valkey, as before: they now use a few milliseconds of CPU
    #: per job, and the engine on all cores ran the compute-bound model faster through the
    #: queue than on all but one (docs/benchmarks.md, "The queue's cost").
    torch_threads: int = Field(default=0, ge=0, le=1024)
    #: Where `inferq run` builds the demo model when no model is named.
    home: Path = Field(default_factory=_default_home)

    # --- request limits -----------------------------------------------------------
    max_n: int = Field(default=8, ge=1, le=128)
    #: Upper bound for `max_tokens`; also the default when a request gives none
    #: (capped further by the context left after the prompt).
    max_tokens_limit: int = Field(default=4096, ge=1)
    default_max_tokens: int = Field(default=512, ge=1)
    max_body_bytes: int = 4 * 1024 * 1024

    # --- access ---------------------------------------------------------------------
    #: API keys allowed (raw, or `sha256:<hex>`). With keys (here or from `inferq keys
    #: create`) every endpoint but /health needs `Authorization: Bearer <key>`.
    api_keys: list[str] = Field(default_factory=list)
    #: Keys (raw or sha256:<hex>) that may also load and unload LoRA adapters through the
    #: API, when keys are on; they work as ordinary keys too.
    admin_keys: list[str] = Field(default_factory=list)
    #: Require a key even when INFERQ_API_KEYS is empty (keys made with `inferq keys create`).
    require_auth: bool = False
    key_ttl_s: int = 365 * 24 * 3600
    #: Requests per minute per key (0: no limit); over it: 429 with Retry-After.
    rate_limit_per_minute: int = 0
    #: Unfinished jobs per key, batch lines included (0: no limit); over it: 429.
    max_active_per_key: int = 0
    #: How long an `Idempotency-Key` and the first answer to it are kept (api.idempotency).
    idempotency_ttl_s: int = Field(default=24 * 3600, ge=60)
    #: `user:password` for Flower's basic auth (required by `inferq run` off loopback).
    flower_basic_auth: str = ""

    @property
    def auth_enabled(self) -> bool:
        return self.require_auth or bool(self.api_keys) or bool(self.admin_keys)

    # --- files and batches ---------------------------------------------------------
    #: Local directory for uploaded, output and error files (the API writes, workers never do).
    files_dir: Path | None = None
    file_ttl_s: int = 30 * 24 * 3600
    max_file_bytes: int = 200 * 1024 * 1024
    max_file_lines: int = 50_000
    #: One JSONL line (one request) at most; keeps the upload's memory bounded too.
    max_line_bytes: int = 4 * 1024 * 1024
    #: Lines of one batch allowed in the queue at once: enough to keep workers' batches
    #: full, never the whole file (a 50k-line batch must not flood the broker).
    batch_window: int = 256
    batch_dispatch_chunk: int = 128

    # --- limits per job -------------------------------------------------------------
    #: A job whose worker process died this many times is failed (`worker_crashed`)
    #: instead of being run again: a poison request must not take the worker down forever.
    max_attempts: int = Field(default=3, ge=1)
    #: Generation time limit per job (the stopping criterion ends it: `failed`, `timeout`);
    #: a request may ask for less, or more up to `max_job_timeout_s`.
    job_timeout_s: float = 600.0
    max_job_timeout_s: float = 3600.0
    #: A job still queued after this long ends `expired` without running.
    queue_expiry_s: float = 24 * 3600.0
    #: Echo engine only (tests): a batch larger than this raises an out-of-memory error.
    echo_oom_above: int = 0

    # --- worker -------------------------------------------------------------------
    #: Celery kills a pool child that has not signalled "alive" within this many
    #: seconds of forking; model import + load + warm-up must fit, or every replacement
    #: child is killed in a loop.
    worker_proc_alive_timeout_s: float = 600.0
    #: Hard per-job limit in seconds (a job past it is failed and the child recycled).
    job_time_limit_s: int = 900
    heartbeat_interval_s: float = 2.0
    #: A worker child's heartbeat lasts this long unless renewed: the one sign that it is
    #: alive. Once it lapses (the worker died) the reaper puts back the jobs it had taken and
    #: sends again those it was running. Bounds recovery after a crash; must be a few
    #: heartbeats long, or a busy machine's late heartbeat would look like a death.
    liveness_s: float = Field(default=15.0, ge=1.0)
    #: How often a worker looks for workers whose heartbeat lapsed.
    reap_interval_s: float = 2.0
    #: Micro-batching: how long a worker waits for more jobs when its batch is not full.
    batch_collect_ms: float = 5.0
    #: ... and keeps waiting, while jobs keep arriving, up to this long (a burst being
    #: submitted fills the first batch instead of starting it nearly empty).
    batch_collect_max_ms: float = 50.0
    #: Micro-batching: ready jobs looked at per free batch row; the batch takes those closest
    #: in token limit, then prompt length, to its first job. 1: strict arrival order.
    batch_length_window: int = Field(default=4, ge=1, le=64)
    #: Job messages a worker parent may hold unacknowledged (tasks/parent_gate.py): it keeps
    #: acknowledging finished jobs' messages while its child drains the backlog. 0: auto,
    #: 4 x max_batch_size + 1 (a batch's mates plus the jobs the length window looks at).
    worker_prefetch: int = Field(default=0, ge=0, le=100_000)
    #: After its own job, a task keeps running batches of ready jobs for up to this long,
    #: so the engine does not idle between Celery deliveries (0: one batch per task).
    drain_s: float = 5.0
    #: Continuous mode: a task adds ready jobs to the running loop for up to this long, then
    #: lets its rows finish and returns to Celery. Longer than `drain_s` because the loop's
    #: rows idle while the last ones finish; bounded because a task must end well inside
    #: Celery's hard time limit (`job_time_limit_s`).
    continuous_drain_s: float = Field(default=60.0, gt=0)
    #: A generation with no step for this long is hung (ms-swift/CUDA can deadlock): the
    #: watchdog fails its jobs with `engine_stalled` and restarts the pool child.
    stall_timeout_s: float = 120.0
    warmup: bool = True
    #: Batch sizes the warm-up runs, a few tokens each: "auto" is every size from 1 to
    #: max_batch_size on a GPU and 1 on a CPU, or a comma list ("1,8,32"). Why on a GPU:
    #: there each new batch size costs seconds the first time it runs (measured on an H200:
    #: a 3-row batch took 3.5 s against 1.6 s for a warm 32-row one), and without the sweep
    #: the first jobs of every new batch size pay that.
    warmup_batch_sizes: str = Field(default="auto", pattern=r"^(auto|\d+(,\d+)*)$")

    # --- observing ----------------------------------------------------------------
    #: Where each finished job's audit line goes: "log" (the `inferq.audit` logger, INFO),
    #: a file path (JSON lines, appended), or "off". `inferq run` defaults it to
    #: $INFERQ_HOME/audit.log, since its console shows warnings only.
    audit_log: str = "log"
    #: Also put each job's messages and output text in its audit line.
    audit_content: bool = False
    #: Bearer token for GET /metrics and GET /status from other hosts; loopback clients
    #: need none. Empty: only loopback clients are answered.
    metrics_token: str = ""

    # --- webhooks -----------------------------------------------------------------
    #: Endpoints for a keyless server (or for every key's events), as JSON:
    #: `[{"url": "https://...", "secret": "whsec_...", "events": ["batch.completed"]}]`;
    #: more are made per key with POST /v1/webhooks.
    webhooks: list[WebhookSetting] = Field(default_factory=list)
    #: The first attempt is immediate; after a failed attempt the next comes this many
    #: seconds later, one entry per retry (Standard Webhooks' schedule, about three days in
    #: all); tests shorten it.
    webhook_retry_s: list[float] = Field(
        default_factory=lambda: [5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 50400.0, 86400.0, 86400.0]
    )
    #: Seconds one delivery may take before it counts as failed.
    webhook_timeout_s: float = Field(default=10.0, gt=0)
    #: Hosts (names or IP addresses/networks) a webhook URL may point to although they are
    #: loopback, private, link-local or metadata addresses: on-premise receivers.
    webhook_allow_hosts: list[str] = Field(default_factory=list)
    #: Seconds an endpoint's previous secret keeps signing (beside the new one) after
    #: POST /v1/webhooks/{id}/rotate_secret, so receivers can switch without a gap.
    webhook_secret_overlap_s: float = Field(default=24 * 3600, ge=0)

    # --- hooks ----------------------------------------------------------------------
    #: Hook objects as `module:attribute`, run in this order after those of the `inferq.hooks`
    #: entry point group (models.hooks).
    hooks: list[str] = Field(default_factory=list)
    #: A system prompt per model id (base or adapter), put first in every request for that
    #: model that brings no system message of its own.
    system_prompts: dict[str, str] = Field(default_factory=dict)

    #: Seconds a client is told to wait (`Retry-After`) when no live worker serves the
    #: model it asked for (503 model_unavailable; api.fleet).
    model_retry_after_s: int = Field(default=10, ge=1)

    # --- queues -------------------------------------------------------------------
    queue_interactive: str = "inferq.interactive"
    queue_jobs: str = "inferq.jobs"
    queue_batch: str = "inferq.batch"

    def lanes(self, model: str) -> list[str]:
        """The lanes of `model` (core.lanes), in priority order: a worker drains earlier
        lanes first."""
        return [lanes.lane(q, model) for q in (self.queue_interactive, self.queue_jobs, self.queue_batch)]

    @property
    def queues(self) -> list[str]:
        """This process's model's lanes: what its worker consumes (Celery's -Q)."""
        return self.lanes(self.model_id)

    @property
    def model_id(self) -> str:
        if self.served_model_name:
            return self.served_model_name
        if self.model_path:
            return Path(self.model_path).name or "model"
        return "inferq-demo"

    @property
    def files_path(self) -> Path:
        return self.files_dir or self.home / "files"

    @property
    def demo_model_dir(self) -> Path:
        return self.home / "demo-model"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()


def version() -> str:
    """inferq's version, as installed (pyproject.toml is the one place it is written)."""
    try:
        return metadata.version("inferq")
    except metadata.PackageNotFoundError:  # run from a checkout that was never installed
        return "0+unknown"
