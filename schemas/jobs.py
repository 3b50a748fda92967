"""The job: what POST /v1/jobs returns and GET /v1/jobs/{id} shows."""

from __future__ import annotations

from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, computed_field

from schemas.openai import ChatCompletion


class JobStatus(StrEnum):
    #: accepted and waiting in a queue
    QUEUED = "queued"
    #: a worker took it (again, after a crash: `attempts` > 1)
    RUNNING = "running"
    #: finished; `result` holds the chat.completion
    SUCCEEDED = "succeeded"
    #: finished with `error`
    FAILED = "failed"
    #: stopped at the client's request
    CANCELLED = "cancelled"
    #: waited in the queue past its expiry; never ran
    EXPIRED = "expired"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED, JobStatus.EXPIRED})

#: Allowed moves of the state machine. RUNNING -> RUNNING is a redelivery after a crash.
TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    JobStatus.QUEUED: frozenset(
        {JobStatus.RUNNING, JobStatus.FAILED, JobStatus.CANCELLED, JobStatus.EXPIRED}
    ),
    JobStatus.RUNNING: frozenset(
        {JobStatus.RUNNING, JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED}
    ),
    JobStatus.SUCCEEDED: frozenset(),
    JobStatus.FAILED: frozenset(),
    JobStatus.CANCELLED: frozenset(),
    JobStatus.EXPIRED: frozenset(),
}


class JobError(BaseModel):
    code: str
    message: str


class Job(BaseModel):
    """Public view of a job record."""

    id: str
    object: Literal["job"] = "job"
    status: JobStatus
    model: str
    #: Unix time in whole seconds, as OpenAI's `created` and this API's files and batches
    #: (the record keeps the fraction, for metrics, the audit log and expiry: job_store)
    created_at: int
    #: a job still queued at this time ends `expired` without running
    expires_at: int | None = None
    started_at: int | None = None
    finished_at: int | None = None
    attempts: int = 0
    #: Our extension: how many rows (requests, counting `n`) the engine call that ran this
    #: job ran at once; in continuous mode the most while it ran.
    engine_rows: int | None = None
    metadata: dict[str, str] = {}
    #: Our extension: the lane (queue) it waits in, and the batch it is a line of
    lane: str | None = None
    batch_id: str | None = None
    result: ChatCompletion | None = None
    error: JobError | None = None

    @computed_field(  # type: ignore[prop-decorator]
        description="Deprecated: `engine_rows` (still sent in this release, then removed).",
        deprecated="use engine_rows",
    )
    @property
    def batch_size(self) -> int | None:
        """The old name of `engine_rows` ("batch" now means only an OpenAI Batch)."""
        return self.engine_rows


class JobList(BaseModel):
    """GET /v1/jobs: OpenAI's list shape. `last_id` is where the next page starts (the last
    job looked at, which a filter may have skipped)."""

    object: Literal["list"] = "list"
    data: list[Job]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool = False
