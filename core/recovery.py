"""Nothing a worker took is lost when it dies: the processing lists, and how jobs leave them.

A worker claims ready job ids into its own processing list (`pop_window`, one script), so
an id is never only in the memory of a process that can die; once its engine call is
filled it gives back what it does not run (`end_claim`). A job leaves the list when it ends
or another worker runs it (the transition script). When a worker's heartbeat lapses,
`reap` puts its queued ids back at the head of their lanes and its running jobs on the
durable RESEND list, from which the reaper sends them again (`pending_resends`, then
`resent` once sent); a live worker between two tasks `settle`s its own list the same way.
rq keeps the same idea in one small class (`rq/intermediate_queue.py`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import redis

from core import keys, scripts


class Recovery:
    """The processing lists of one Redis: claim, tidy, reap, resend."""

    def __init__(self, client: redis.Redis, ttl: int) -> None:
        self.r = client
        self.ttl = ttl
        self._pop = client.register_script(scripts.source("pop"))
        self._tidy = client.register_script(scripts.source("tidy"))
        self._reap = client.register_script(scripts.source("reap"))

    def pop_window(
        self, queues: Sequence[str], count: int, worker: str
    ) -> list[list[tuple[str, dict[str, str]]]]:
        """Up to `count` ready ids off `queues`, in priority order (what the first lacks is
        taken from the next), into `worker`'s processing list: until `end_claim` (those it
        does not run) or their job ends (those it runs). If `worker` dies first, `reap` puts
        them back. Only queued jobs are taken; per queue, in order, each job's id and record
        (its raw fields, `core.job_store.decode` reads them)."""
        pop_keys = [keys.processing(worker), keys.PROCESSING_WORKERS, *(keys.ready(q) for q in queues)]
        lanes = cast(list[list[Any]], self._pop(keys=pop_keys, args=[count, self.ttl, worker]))
        return [
            [
                (lane[i], dict(zip(lane[i + 1][::2], lane[i + 1][1::2], strict=True)))
                for i in range(0, len(lane), 2)
            ]
            for lane in lanes
        ]

    def end_claim(self, worker: str) -> None:
        """The batch is filled: the ids `worker` took and does not run go back to the head
        of their lanes in their order (queued ones) or leave its list (the rest)."""
        self._tidy(keys=[keys.processing(worker)], args=[worker, self.ttl])

    def worker_alive(self, worker: str) -> bool:
        return bool(worker) and bool(self.r.exists(keys.worker(worker)))

    def reap(self) -> int:
        """For every worker whose heartbeat lapsed: its queued ids back at the head of their
        lanes, the jobs it was running to RESEND; returns how many it moved there."""
        workers = sorted(cast(set[str], self.r.smembers(keys.PROCESSING_WORKERS)))
        if not workers:
            return 0
        pipe = self.r.pipeline(transaction=False)
        for worker in workers:  # one round trip: every worker does this every reap interval
            pipe.exists(keys.worker(worker))
        alive = cast(list[int], pipe.execute())
        return sum(self._reap_one(w, own=False) for w, up in zip(workers, alive, strict=True) if not up)

    def settle(self, worker: str) -> int:
        """The same for a live worker between two tasks, whose list should be empty then: a
        task that ended without ending its jobs (Redis went away mid-batch) leaves them
        running on a worker that is alive but runs nothing, which no reaper would take."""
        return self._reap_one(worker, own=True)

    def _reap_one(self, worker: str, own: bool) -> int:
        job_keys = [keys.processing(worker), keys.PROCESSING_WORKERS, keys.worker(worker), keys.RESEND]
        return int(self._reap(keys=job_keys, args=[worker, self.ttl, "1" if own else "0"]))

    def pending_resends(self, limit: int = 1000) -> list[tuple[str, str]]:
        """(job id, lane) of the jobs waiting to be sent again (`resent` once sent)."""
        entries = cast(list[str], self.r.lrange(keys.RESEND, 0, limit - 1))
        return [(job_id, lane) for job_id, _, lane in (e.partition("|") for e in entries)]

    def resent(self, job_id: str, lane: str) -> None:
        self.r.lrem(keys.RESEND, 0, f"{job_id}|{lane}")

    def unwoken(self, lanes: Sequence[str], look: int = 16) -> list[tuple[str, str]]:
        """(lane, job id): for each of `lanes` whose broker queue (the Celery list named as
        the lane) is empty while its ready list is not, the first queued job of the ready
        list. Such a job may have no message left anywhere: the broker keeps no copy of a
        message a worker fetched, so one a dead worker parent held is gone (celeryconfig).
        Ids of ended or vanished jobs met on the way leave the ready list. One round trip
        when every lane is quiet."""
        pipe = self.r.pipeline(transaction=False)
        for lane in lanes:
            pipe.llen(lane)
            pipe.lrange(keys.ready(lane), 0, look - 1)
        replies = pipe.execute()
        found: list[tuple[str, str]] = []
        for lane, waiting, ids in zip(lanes, replies[::2], replies[1::2], strict=True):
            if waiting or not ids:
                continue
            first = self._first_queued(lane, cast(list[str], ids))
            if first is not None:
                found.append((lane, first))
        return found

    def _first_queued(self, lane: str, ids: list[str]) -> str | None:
        pipe = self.r.pipeline(transaction=False)
        for job_id in ids:
            pipe.hget(keys.job(job_id), "status")
        statuses = cast(list[str | None], pipe.execute())
        first = next((j for j, st in zip(ids, statuses, strict=True) if st == "queued"), None)
        ended = [j for j, st in zip(ids, statuses, strict=True) if st not in ("queued", "running")]
        if ended:
            pipe = self.r.pipeline(transaction=False)
            for job_id in ended:
                pipe.lrem(keys.ready(lane), 0, job_id)
            pipe.execute()
        return first
