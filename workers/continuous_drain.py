"""The drain of a worker child in continuous mode: jobs join the running generation loop.

Why a drain of its own: the static drain hands the engine one call at a time and waits for
it to end. Here the loop keeps running: while rows are free the child claims the next ready
job (lanes in priority order, the same processing list as static calls) and adds its
rows at once; each job ends, and writes its result, as soon as its own rows are done.
Everything else is the static path's: the state machine, batch lines, cancel flags and
time limits through the sink, one outcome per job.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace

from core.job_store import JobRecord, JobStore
from workers.engine import ContinuousEngine, GenResult
from workers.options import RunOptions, interactive_reserve
from workers.runner import (
    RunOutcome,
    count_call,
    fill_call,
    finish_all,
    gen_requests,
)
from workers.streaming import StreamSink, Target

logger = logging.getLogger(__name__)

#: how often, at most, the lanes are looked at for a job to add while rows are free
ADMIT_INTERVAL_S = 0.01


@dataclass
class _Job:
    record: JobRecord
    rows: range
    results: dict[int, GenResult | Exception] = field(default_factory=dict)
    #: most rows the engine ran at once while this job ran (its record's `engine_rows`)
    peak: int = 0


class _Drain:
    def __init__(self, store: JobStore, engine: ContinuousEngine, opts: RunOptions) -> None:
        self.store, self.engine, self.opts = store, engine, opts
        self.sink = StreamSink(store.r, [])
        self.jobs: dict[str, _Job] = {}
        self.by_row: dict[int, str] = {}
        self.outcomes: list[RunOutcome] = []
        engine.open(self.sink)

    def admit(self, records: list[JobRecord]) -> None:
        now = time.time()
        for rec in records:
            reqs = gen_requests(rec.request, self.opts.default_max_tokens, self.opts.base_model)
            publish = self.opts.publish_tokens and rec.publish_tokens
            attempt = rec.job.attempts + 1
            targets = [Target(rec.job.id, i, attempt, publish) for i in range(len(reqs))]
            rows = self.sink.extend(targets, deadline=now + (rec.timeout_s or self.opts.timeout_s))
            self.jobs[rec.job.id] = _Job(rec, rows)
            for row, req in zip(rows, reqs, strict=True):
                self.by_row[row] = rec.job.id
                self.engine.add(row, req)
        self._track()

    def _track(self) -> None:
        if self.opts.running is not None:
            self.opts.running[:] = list(self.jobs)
        active = self.engine.active_rows()
        for job in self.jobs.values():
            job.peak = max(job.peak, active)

    def step(self, timeout_s: float) -> None:
        # cancel flags and time limits too: the engine asks the sink (polled every 100 ms at most)
        for row, res in self.engine.poll(timeout_s):
            job = self.jobs.get(self.by_row.get(row, ""))
            if job is not None:
                job.results[row] = res
        self._track()
        self._finish([j for j in self.jobs.values() if len(j.results) == len(j.rows)])

    def _finish(self, jobs: list[_Job]) -> None:
        if not jobs:
            return
        self.sink.flush()
        self.sink.wait_written()  # every token event is written before the jobs' final events
        steps, rows = self.engine.take_step_counts()
        if steps:
            count_call(self.store, rows, steps)
        by_peak: dict[int, list[_Job]] = {}
        for job in jobs:
            by_peak.setdefault(job.peak, []).append(job)
        for peak, group in by_peak.items():
            runs = [(j.record, [j.results[r] for r in j.rows]) for j in group]
            self.outcomes += finish_all(self.store, runs, self.sink, peak, self.opts.hooks)
        for job in jobs:
            del self.jobs[job.record.job.id]
            for row in job.rows:
                self.by_row.pop(row, None)
            self.sink.retire(job.record.job.id)
        self._track()

    def close(self) -> None:
        self.engine.close()
        self.sink.stop()


def drain_continuous(
    job_id: str, store: JobStore, engine: ContinuousEngine, opts: RunOptions, budget_s: float
) -> list[RunOutcome]:
    """Run this message's job and keep adding ready jobs to the running loop for up to
    `budget_s` while rows are free; then finish what runs. An interactive job waits at most
    until a row is free, not until a call ends."""
    records = fill_call(store, job_id, opts)
    if not records:
        return [RunOutcome(None, skipped=True)]
    d = _Drain(store, engine, opts)
    try:
        d.admit(records)
        deadline = time.monotonic() + budget_s
        last_admit = 0.0
        reserve = interactive_reserve(opts.max_batch_size)
        while d.jobs:
            now = time.monotonic()
            free = opts.max_batch_size - engine.active_rows()
            # rows beyond MAX_BATCH_SIZE are kept for the first (interactive) lane: a chat
            # request starts within a step even when long batch lines hold every other row
            lanes, rows = (opts.lanes, free) if free > 0 else (opts.lanes[:1], free + reserve)
            admit = rows > 0 and lanes and now < deadline
            if admit and now - last_admit >= ADMIT_INTERVAL_S:
                last_admit = now
                lane_opts = replace(opts, lanes=lanes, max_batch_size=rows, collect_s=0.0)
                if records := fill_call(store, None, lane_opts):
                    # the first ready job and more that fit, without the static path's collect wait
                    d.admit(records)
                    continue
            d.step(ADMIT_INTERVAL_S if admit else 0.1)
    except Exception:
        logger.exception("continuous drain failed with %d jobs running", len(d.jobs))
        for job in d.jobs.values():
            for row in job.rows:
                job.results.setdefault(row, RuntimeError("the continuous drain failed"))
        d._finish(list(d.jobs.values()))
    finally:
        d.close()
    return d.outcomes
