"""Filling a call: which queued jobs join the job whose message the worker is running.

Why by token limit and prompt length: a static call runs until its longest row ends, and
HF `generate` pads every row to its longest prompt, so a call of similar jobs wastes less
compute. Measured on the tiny model (CPU, 8 rows per call): the same 256 mixed-length requests ran
about 15 % faster sorted by length than in arrival order (docs/benchmarks.md). The worker
looks at up to `length_window` times the free rows of ready jobs and takes those closest
to the call's first job (`closest_fits`); the others go
back to the head of their list in their order, and the head is always the next call's
first job, so nobody waits more than a few calls for being an outlier.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable

from core.job_store import JobRecord, JobStore, Move, decode
from schemas.jobs import JobStatus
from workers.options import RunOptions


def closest_fits(
    first: JobRecord, candidates: list[JobRecord], rows: int, default_max_tokens: int = 512
) -> list[JobRecord]:
    """Up to `rows` rows (a job takes `n` of them) from `candidates`, those closest to `first`
    in token limit first, then in prompt length (ties: earlier first); returned in arrival
    order. Why the token limit first: a static call runs until its longest row ends, so a
    row that asks for 8 tokens beside one that asks for 48 idles for 40 steps; a prompt
    longer by a few tokens only costs padding in the prefill."""

    def limit(rec: JobRecord) -> int:
        return rec.request.token_limit or default_max_tokens

    chosen: set[int] = set()
    ranked = sorted(
        range(len(candidates)),
        key=lambda i: (
            abs(limit(candidates[i]) - limit(first)),
            abs(candidates[i].prompt_tokens - first.prompt_tokens),
        ),
    )
    for i in ranked:
        if candidates[i].request.n <= rows:
            chosen.add(i)
            rows -= candidates[i].request.n
        if rows <= 0:
            break
    return [rec for i, rec in enumerate(candidates) if i in chosen]


#: jobs popped off the lanes, one list per lane in priority order
Window = list[list[JobRecord]]


def pop_window(store: JobStore, opts: RunOptions, count: int, seen: set[str]) -> Window:
    """Up to `count` queued jobs off the lanes, with their records, into this worker's
    processing list (core.recovery); ids already `seen` (a duplicate in a ready list) are
    dropped, the others added to it."""
    window: Window = []
    for lane in store.recovery.pop_window(opts.lanes, count, opts.worker_id):
        records = [rec for job_id, raw in lane if job_id not in seen and (rec := decode(raw)) is not None]
        seen.update(job_id for job_id, _ in lane)
        window.append(records)
    return window


def claim_more(
    store: JobStore,
    first: JobRecord,
    opts: RunOptions,
    rows: int,
    compatible: Callable[[JobRecord], bool],
    window: Window | None = None,
    seen: set[str] | None = None,
) -> list[JobRecord]:
    """Pull queued jobs that can share `first`'s generate call (`compatible`), up to
    `max_batch_size` rows, and end this worker's claim (`JobStore.end_claim`). `window`:
    jobs this claim already popped (with `first`), looked at before any more are popped.

    Their own Celery messages stay in the queue: when they arrive later, the job is already
    finished and the message is skipped, so each job still has its own task in Flower.
    The ids looked at and left stay in this worker's processing list until the claim ends,
    then go back to the head of their lane once, in order (popping and pushing them back on
    every wait would only ever see them again, never the jobs arriving behind them)."""
    claimed: list[JobRecord] = []
    seen = seen if seen is not None else {first.job.id}
    deadline = time.monotonic() + opts.collect_max_s
    try:
        for attempt in itertools.count():
            before = rows
            free = opts.max_batch_size - rows
            if free > 0:
                popped = (
                    window if window is not None else pop_window(store, opts, free * opts.length_window, seen)
                )
                window = None
                rows += _claim_from(store, first, opts, free, compatible, popped, claimed)
            # A shallow queue: give more jobs `collect_s` to arrive, and again while they keep
            # arriving (a burst being submitted), up to `collect_max_s`. A lone request waits
            # `collect_s` once; the first call of a burst does not start nearly empty.
            if rows >= opts.max_batch_size or (attempt and rows == before) or not opts.collect_s:
                break
            wait = min(opts.collect_s, deadline - time.monotonic())
            if wait <= 0:
                break
            time.sleep(wait)
    finally:
        store.recovery.end_claim(opts.worker_id)
    return claimed


def _claim_from(
    store: JobStore,
    first: JobRecord,
    opts: RunOptions,
    free: int,
    compatible: Callable[[JobRecord], bool],
    window: Window,
    claimed: list[JobRecord],
) -> int:
    """Claim the closest fits of `window` for `free` rows, an earlier lane's before a later
    one's, in one round trip; returns the rows claimed."""
    now = time.time()
    chosen: list[JobRecord] = []
    for records in window:
        fits = [rec for rec in records if _may_join(rec, now, compatible)]
        picked = closest_fits(first, fits, free, opts.default_max_tokens)
        free -= sum(rec.request.n for rec in picked)
        chosen += picked
    moves = [Move(rec.job.id, JobStatus.RUNNING, worker=opts.worker_id) for rec in chosen]
    taken = 0
    for rec, res in zip(chosen, store.apply(moves), strict=True):
        if res.ok:
            claimed.append(rec)
            taken += rec.request.n
    return taken


def _may_join(rec: JobRecord, now: float, compatible: Callable[[JobRecord], bool]) -> bool:
    if rec.status is not JobStatus.QUEUED:
        return False  # gone, cancelled or taken: its own message ends it
    if rec.expires_at and now > rec.expires_at:
        return False  # its own message will end it `expired`
    return compatible(rec)
