"""Engine lifecycle inside a Celery pool child.

Why here and not at import: the parent process forks the pool children and must never
import torch/ms-swift or touch CUDA; each child loads its own engine once, on
`worker_process_init`, warms it up, and then announces itself with a heartbeat key that
`/ready` reads. Load time must stay below `worker_proc_alive_timeout` (raised in
celeryconfig), or Celery kills every replacement child in a loop.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any, NoReturn, cast

import redis
from kombu.exceptions import OperationalError

from core import keys, redis_conn
from core.audit import AuditLog
from core.config import Settings, get_settings
from core.job_store import JobStore
from models.hooks import hooks_for
from models.spec import resolve_model
from schemas.jobs import JobError
from tasks import engine_failure, events
from tasks.app import send_job
from workers import adapters, options, runner
from workers.engine import Engine, GenParams, GenRequest
from workers.engines import load_engine

logger = logging.getLogger(__name__)

#: How often a worker looks for adapters loaded or unloaded through the API (and rescans
#: INFERQ_ADAPTERS_DIR where the file system sends no change events).
ADAPTER_POLL_S = 2.0


class WorkerState:
    """Everything a child keeps between jobs (arq's `ctx`, in effect)."""

    def __init__(self, settings: Settings, engine: Engine) -> None:
        self.settings = settings
        self.engine = engine
        self.redis = redis_conn.sync_client(
            settings.redis_url,
            master=settings.redis_sentinel_master,
            decode_responses=True,
            socket_timeout=30,
            health_check_interval=30,
        )
        self.store = JobStore(
            self.redis, settings.result_ttl_s, AuditLog(settings.audit_log, settings.audit_content)
        )
        #: the heartbeat's own connection, with a timeout well inside `liveness_s`: a beat
        #: stuck behind a slow call would let the key lapse and make this worker look dead
        self._beat_redis = redis_conn.sync_client(
            settings.redis_url,
            master=settings.redis_sentinel_master,
            decode_responses=True,
            socket_timeout=max(0.5, settings.liveness_s / 4),
        )
        #: when a beat last failed (None: none has)
        self._beat_failed_at: float | None = None
        self.worker_id = options.process_worker_id()
        self.started_at = time.time()
        self.jobs_done = 0
        #: the engine's count when this state began (warm-up excluded), and at the last beat
        self._tokens_base = engine.generated_tokens()
        self._last_tokens = (time.monotonic(), 0)
        #: seconds spent in tasks (busy ratio): finished ones, and since when the current one runs
        self._busy_s = 0.0
        self._busy_since: float | None = None
        self._last_beat = (time.monotonic(), 0.0)
        #: the jobs whose generation is running now (the watchdog fails them if it hangs)
        self.current: list[str] = []
        #: held by a task for as long as it runs: between tasks the heartbeat settles this
        #: worker's processing list (`JobStore.settle`)
        self.task_lock = threading.Lock()
        #: a task ran since this worker's list was last settled (the end of a task settles
        #: it; if Redis was away then, the reap loop does, and only then: one script call
        #: less per idle worker and reap interval)
        self.unsettled = True
        self._stop = threading.Event()
        self._beat = threading.Thread(target=self._heartbeat_loop, name="inferq-heartbeat", daemon=True)
        self._reaper = threading.Thread(target=self._reap_loop, name="inferq-reaper", daemon=True)
        self._watchdog = threading.Thread(target=self._watchdog_loop, name="inferq-watchdog", daemon=True)
        self._adapters = threading.Thread(target=self._adapters_loop, name="inferq-adapters", daemon=True)
        #: the on-demand unloads this worker applies, against the directory entries they hide
        self.unloads = adapters.Unloads()
        #: what the API needs to count this model's prompts (models.prompts.counter_for)
        self.announced = announcement(settings, engine)

    def start(self) -> None:
        self._beat.start()
        self._reaper.start()
        self._watchdog.start()
        if hasattr(self.engine, "sync_adapters"):
            self._adapters.start()

    def sync_adapters(self) -> None:
        """Serve what INFERQ_ADAPTERS_DIR holds now, with the loads and unloads asked for
        through the API (workers.adapters); the next heartbeat tells the API. Refusals go
        to Redis for the load endpoint to answer with."""
        sync = getattr(self.engine, "sync_adapters", None)
        if sync is None:
            return
        overrides = cast(dict[str, str], self.redis.hgetall(keys.ADAPTER_OVERRIDES))
        problems: dict[str, str] = {}
        ended: dict[str, str] = {}

        def read() -> dict[str, adapters.AdapterDir]:
            plan = adapters.wanted(self.settings.adapters_dir, overrides, self.unloads)
            problems.update(plan.problems)
            ended.update(plan.ended)
            return plan.serve

        sync(read)
        for name, raw in ended.items():
            self._end_override(name, raw)
        refused = {**problems, **self.engine.adapter_facts()["refused"]}  # type: ignore[attr-defined]
        if refused:
            pipe = self.redis.pipeline(transaction=False)
            for name, why in refused.items():
                entry = {"reason": why, "worker": self.worker_id, "at": time.time()}
                pipe.hset(keys.ADAPTER_REFUSALS, name, json.dumps(entry))
            pipe.expire(keys.ADAPTER_REFUSALS, self.settings.result_ttl_s)
            pipe.execute()

    def end_unloads(self) -> None:
        """At this worker's start: every on-demand unload ends (the directory is the truth,
        and an unload must not outlive the run that asked for it, kept in the AOF). For every
        worker at once, since they all read the one hash."""
        for name, raw in cast(dict[str, str], self.redis.hgetall(keys.ADAPTER_OVERRIDES)).items():
            if adapters.is_unload(raw) and self._end_override(name, raw):
                logger.info("the on-demand unload of adapter %r ends with this worker's start", name)

    def _end_override(self, name: str, raw: str) -> bool:
        """Delete the override of `name` if it is still `raw`: an API process may have just
        written a newer one, which stays."""
        with self.redis.pipeline() as pipe:
            try:
                pipe.watch(keys.ADAPTER_OVERRIDES)  # type: ignore[no-untyped-call]
                if pipe.hget(keys.ADAPTER_OVERRIDES, name) != raw:
                    return False
                pipe.multi()
                pipe.hdel(keys.ADAPTER_OVERRIDES, name)
                pipe.execute()
            except redis.WatchError:  # the hash changed meanwhile: the next sync looks again
                return False
        return True

    def _adapters_loop(self) -> None:
        """A rescan on every change in INFERQ_ADAPTERS_DIR, and every ADAPTER_POLL_S (on-demand
        loads through the API; file systems that send no change events). A reload waits for
        the running `generate` (the engine's lock)."""
        root = self.settings.adapters_dir
        if root is None:
            ticks: Iterator[object] = iter(lambda: self._stop.wait(ADAPTER_POLL_S), True)
        else:
            import watchfiles

            root.mkdir(parents=True, exist_ok=True)
            ms = int(ADAPTER_POLL_S * 1000)
            ticks = watchfiles.watch(root, stop_event=self._stop, rust_timeout=ms, yield_on_timeout=True)
        for _ in ticks:
            try:
                self.sync_adapters()
            except redis.RedisError as exc:
                logger.warning("adapter sync: %s", exc)
            except Exception:  # a bad adapter must never take the worker down
                logger.exception("rescanning the adapters failed")

    def stalled(self) -> bool:
        last = self.engine.progress()
        return last is not None and time.monotonic() - last > self.settings.stall_timeout_s

    def _watchdog_loop(self) -> None:
        period = min(1.0, self.settings.stall_timeout_s / 4)
        while not self._stop.wait(period):
            if not self.stalled():
                continue
            jobs = list(self.current)
            logger.error(
                "generation made no progress for %.0fs; failing %s and restarting this child",
                self.settings.stall_timeout_s,
                jobs,
            )
            error = JobError(
                code="engine_stalled",
                message=f"generation made no progress for {self.settings.stall_timeout_s:.0f}s",
            )
            for job_id in jobs:
                try:
                    runner.fail(self.store, job_id, error)
                except redis.RedisError as exc:
                    logger.error("could not fail %s: %s", job_id, exc)
            # A hung generate cannot be interrupted from Python: replace the process. The
            # parent forks a fresh child; the requeued message finds its job failed and is skipped.
            self.stop()
            os._exit(70)

    def stop(self) -> None:
        """Stop beating and delete the heartbeat: the reaper takes this worker's jobs at once.
        After the beating thread ends, or a beat it was sending would bring the key back."""
        self._stop.set()
        if self._beat.is_alive() and threading.current_thread() is not self._beat:
            self._beat.join(timeout=5)
        with contextlib.suppress(redis.RedisError):
            self.redis.delete(keys.worker(self.worker_id))
            self.redis.zrem(keys.WORKERS, self.worker_id)

    @contextlib.contextmanager
    def busy(self) -> Iterator[None]:
        """Around a task: the heartbeat reports the share of time spent in them."""
        self._busy_since = time.monotonic()
        self.unsettled = True
        try:
            yield
        finally:
            self._busy_s += time.monotonic() - self._busy_since
            self._busy_since = None

    def busy_ratio(self) -> float:
        """Busy share since the previous beat."""
        now = time.monotonic()
        since = self._busy_since
        busy = self._busy_s + (now - since if since is not None else 0.0)
        then, busy_then = self._last_beat
        self._last_beat = (now, busy)
        return min(1.0, max(0.0, (busy - busy_then) / (now - then))) if now > then else 0.0

    def tokens_generated(self) -> int:
        """Tokens this worker's engine made, counted step by step (workers.engine): a job's
        `completion_tokens`, added when it ends, would leave the rate at 0 for as long as a
        long job runs and then show one spike."""
        return self.engine.generated_tokens() - self._tokens_base

    def tokens_per_s(self, total: int) -> float:
        """Tokens per second since the previous beat (as `busy_ratio`): the rate `inferq top`
        and `inferq status` show, the same over any refresh interval they use."""
        now = time.monotonic()
        then, before = self._last_tokens
        self._last_tokens = (now, total)
        return max(0.0, (total - before) / (now - then)) if now > then else 0.0

    def _adapter_counts(self) -> dict[str, Any]:
        """For the heartbeat: loads and unloads so far, and the adapters refused (name -> why),
        for the API to answer a request for one with its reason."""
        facts = getattr(self.engine, "adapter_facts", None)
        if facts is None:
            return {}
        f = facts()
        return {
            "adapter_loads": f["loads"],
            "adapter_unloads": f["unloads"],
            "refused_adapters": f.get("refused_now", {}),
        }

    def adapter_names(self) -> list[str]:
        names = getattr(self.engine, "adapter_names", None)
        return list(names()) if names is not None else []

    def gpu_memory_bytes(self) -> int | None:
        """Memory torch holds on this worker's GPU (None on a CPU)."""
        torch = sys.modules.get("torch")
        if torch is None or not self.engine.facts.accelerator or not torch.cuda.is_initialized():
            return None
        return int(torch.cuda.memory_reserved())

    def heartbeat(self) -> None:
        facts = self.engine.facts
        info: dict[str, Any] = {
            "worker_id": self.worker_id,
            "pid": os.getpid(),
            "model": facts.model_id,
            "lanes": self.settings.queues,
            "context_length": facts.context_length,
            "demo": facts.demo,
            "started_at": self.started_at,
            "jobs_done": self.jobs_done,
            "tokens_generated": (tokens := self.tokens_generated()),
            "tokens_per_s": round(self.tokens_per_s(tokens), 1),
            "adapters": self.adapter_names(),
            "lora": hasattr(self.engine, "sync_adapters"),
            **self._adapter_counts(),
            "busy_ratio": round(self.busy_ratio(), 4),
            "gpu_memory_bytes": self.gpu_memory_bytes(),
            "at": time.time(),
        }
        ttl_ms = int(max(self.settings.liveness_s, self.settings.heartbeat_interval_s * 2) * 1000)
        pipe = self._beat_redis.pipeline(transaction=False)
        pipe.set(keys.worker(self.worker_id), json.dumps(info), px=ttl_ms)
        pipe.zadd(keys.WORKERS, {self.worker_id: info["at"]})
        pipe.expire(keys.WORKERS, int(ttl_ms / 1000) + 60)
        pipe.hset(keys.MODELS, facts.model_id, json.dumps({**self.announced, "at": info["at"]}))
        pipe.expire(keys.MODELS, self.settings.result_ttl_s)
        pipe.execute()

    def _heartbeat_loop(self) -> None:
        """Beats only: nothing else may delay a beat."""
        while not self._stop.wait(self.settings.heartbeat_interval_s):
            try:
                self.heartbeat()
            except redis.RedisError as exc:  # Redis down: keep beating, it comes back
                self._beat_failed_at = time.monotonic()
                logger.warning("heartbeat failed: %s", exc)
            except Exception:  # anything else must not end the heartbeat (the worker would vanish)
                logger.exception("heartbeat failed")

    def _reap_loop(self) -> None:
        """Every reap interval: dead workers' lists, this worker's own between tasks (and,
        idle, the ready jobs no message would wake), then one pass over what waits to be
        sent again."""
        while not self._stop.wait(self.settings.reap_interval_s):
            try:
                if self.may_reap():
                    self.store.recovery.reap()
                if self.task_lock.acquire(blocking=False):
                    try:
                        if self.unsettled:
                            self._settle_own()
                            self.unsettled = False
                        self.wake_unwoken()
                    finally:
                        self.task_lock.release()
                self.send_pending()
            except redis.RedisError as exc:
                logger.warning("reaping failed: %s", exc)
            except Exception:
                logger.exception("reaping failed")

    def may_reap(self) -> bool:
        """After an outage every heartbeat lapsed, the live workers' too: reap only once this
        worker's beats have succeeded for a whole `liveness_s` again, when the others have
        had the same time to beat."""
        failed = self._beat_failed_at
        return failed is None or time.monotonic() - failed >= self.settings.liveness_s

    def reap(self) -> int:
        """The one rule of crash recovery: a worker whose heartbeat lapsed is dead; the ids it
        had taken go back to the head of their lanes and the jobs it was running are sent
        again (`JobStore.reap`). An old message of such a job, if it is ever redelivered,
        finds it running on a live worker or finished, and is skipped."""
        if not self.may_reap():
            return 0
        self.store.recovery.reap()
        return self.send_pending()

    def settle(self) -> int:
        """Between tasks: jobs this worker took and no longer runs (its task ended without
        ending them) are put back or sent again. Call with `task_lock` held: at the end of a
        task that failed, and from the reap loop once idle after any task. Nothing is read
        beyond the one script when there is nothing to send."""
        moved = self._settle_own()
        self.unsettled = False
        return self.send_pending() if moved else 0

    def wake_unwoken(self) -> int:
        """Idle, with ready jobs in a lane whose broker queue is empty: send a message for
        the first, which this worker (or another idle one) takes, and its task drains the
        lane. Why: the broker keeps no copy of a fetched message (celeryconfig), so a worker
        parent that died holding messages leaves their jobs' ids in the ready lists with
        nothing to wake a worker. Otherwise it is a spare wake-up, skipped if needless."""
        sent = 0
        for lane, job_id in self.store.recovery.unwoken(self.settings.queues):
            send_job(job_id, lane, events.job_facts(self.redis, job_id).get("model", ""))
            logger.info("job %s waited in lane %s with no message to wake a worker; sent one", job_id, lane)
            sent += 1
        return sent

    def _settle_own(self) -> int:
        moved = self.store.recovery.settle(self.worker_id)
        if moved:
            logger.warning("jobs were left running when the last task ended; sending them again")
        return moved

    def send_pending(self) -> int:
        """Send the jobs waiting in RESEND; each leaves it once its message is sent (a job
        that cannot be sent is tried again at the next reap)."""
        return self._send_again(self.store.recovery.pending_resends())

    def _send_again(self, jobs: list[tuple[str, str]]) -> int:
        sent = 0
        for job_id, lane in jobs:
            try:
                send_job(job_id, lane, events.job_facts(self.redis, job_id).get("model", ""))
            except (redis.RedisError, OperationalError):
                raise  # the broker is away: every entry stays, for the next reap
            except Exception as exc:  # this job can never be sent (e.g. a lane Celery does not
                # know): it fails, and must not stop the others
                logger.exception("could not send job %s again (lane %r)", job_id, lane)
                error = JobError(code="resend_failed", message=f"{type(exc).__name__}: {exc}")
                runner.fail(self.store, job_id, error)
            else:
                logger.warning("job %s lost its worker; sent it again", job_id)
                sent += 1
            self.store.recovery.resent(job_id, lane)
        return sent


_state: WorkerState | None = None


def warmup_sizes(setting: str, max_batch_size: int, accelerator: bool) -> list[int]:
    """The batch sizes to warm up (see Settings.warmup_batch_sizes), within 1..max_batch_size."""
    if setting == "auto":
        return list(range(1, max_batch_size + 1)) if accelerator else [1]
    return sorted({min(max(int(x), 1), max_batch_size) for x in setting.split(",")})


def warm_up(engine: Engine, sizes: list[int]) -> float:
    """A short generation at each row count, so real jobs do not pay for lazy init: on a
    GPU much of it (kernels loaded on first use) comes once per new row count. Prompts of
    varied length, as real calls are padded to their longest."""
    t0 = time.monotonic()
    for n in sizes:
        engine.generate(
            [
                GenRequest(
                    messages=[{"role": "user", "content": "hi " * (1 + (i * 7) % 23)}],
                    params=GenParams(max_tokens=4),
                )
                for i in range(n)
            ]
        )
    return time.monotonic() - t0


def _report_load_failure(settings: Settings, exc: Exception) -> NoReturn:
    """A child that cannot load its engine says why in Redis (for `inferq run`, which stops
    waiting and prints it), stops its parent (tasks.engine_failure) and exits: left
    running it would take jobs and fail them all."""
    # the traceback helps with --verbose (INFO); at the default level one line says it
    verbose = logger.isEnabledFor(logging.INFO)
    hint = "" if verbose else " (--verbose shows the traceback)"
    logger.error(
        "this worker child could not load its engine: %s: %s%s",
        type(exc).__name__,
        exc,
        hint,
        exc_info=verbose,
    )
    with contextlib.suppress(redis.RedisError):
        client = redis_conn.sync_client(
            settings.redis_url, master=settings.redis_sentinel_master, socket_timeout=5
        )
        info = json.dumps({"at": time.time(), "error": f"{type(exc).__name__}: {exc}"})
        client.set(keys.worker_failure(options.process_worker_id()), info, ex=keys.WORKER_FAILURE_TTL_S)
    engine_failure.tell_parent()
    logging.shutdown()
    os._exit(engine_failure.ENGINE_FAILED)


def announcement(settings: Settings, engine: Engine) -> dict[str, Any]:
    """How the API counts this model's prompts (its template, read from the model's path:
    the API host must see the same path), announced with every heartbeat under the model's
    id (keys.MODELS)."""
    spec = resolve_model(settings)
    return {
        "engine": settings.engine,
        "path": str(spec.path),
        "model_type": spec.model_type,
        "template": spec.template,
        "context_length": engine.facts.context_length,
        "demo": engine.facts.demo,
    }


def init_child(**_: Any) -> None:
    """`worker_process_init` handler: load, warm up, announce."""
    global _state
    settings = get_settings()
    t0 = time.monotonic()
    try:
        hooks_for(settings.hooks)  # once per process, first: a hook that cannot load stops the worker
        engine = load_engine(settings)
    except Exception as exc:
        _report_load_failure(settings, exc)
    if settings.warmup:
        sizes = warmup_sizes(settings.warmup_batch_sizes, settings.max_batch_size, engine.facts.accelerator)
        logger.info("warm-up (rows per call %s) took %.2fs", sizes, warm_up(engine, sizes))
    if engine.facts.demo:
        logger.warning(
            "SERVING THE DEMO MODEL %r: random weights, its output is gibberish. "
            "Name a real model with `inferq run --model PATH`.",
            engine.facts.model_id,
        )
    _state = WorkerState(settings, engine)
    with contextlib.suppress(redis.RedisError):
        if hasattr(engine, "sync_adapters"):
            _state.end_unloads()
        _state.sync_adapters()  # before the first beat: the API then lists them at once
    _state.heartbeat()
    _state.start()
    logger.info("worker child %s ready in %.1fs", _state.worker_id, time.monotonic() - t0)


def shutdown_child(**_: Any) -> None:
    if _state is not None:
        _state.stop()


def state() -> WorkerState:
    if _state is None:
        raise RuntimeError("engine not loaded in this process (worker_process_init did not run)")
    return _state
