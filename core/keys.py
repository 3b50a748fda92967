"""Every Redis key inferq writes, in one namespace.

Each key here is written with a TTL (`Settings.result_ttl_s`) or a MAXLEN; the
comment on each says which.
"""

from __future__ import annotations

PREFIX = "inferq:"


def job(job_id: str) -> str:
    """Hash: the job record, source of truth for status/request/result. TTL: result_ttl_s."""
    return f"{PREFIX}job:{job_id}"


def worker(worker_id: str) -> str:
    """String: a worker child's heartbeat with its engine facts. TTL: 3 heartbeats."""
    return f"{PREFIX}worker:{worker_id}"


WORKER_PATTERN = f"{PREFIX}worker:*"


def job_events(job_id: str) -> str:
    """Stream: status changes and token deltas of one job. MAXLEN ~ and TTL: result_ttl_s."""
    return f"{PREFIX}events:{job_id}"


def cancel(job_id: str) -> str:
    """String flag: the job was asked to stop. TTL: result_ttl_s."""
    return f"{PREFIX}cancel:{job_id}"


def stats() -> str:
    """Hash of counters (jobs run, batches, tokens). TTL: refreshed on every write."""
    return f"{PREFIX}stats"
