"""The audit log: one JSON line per finished job, whoever finished it (a worker, the API's
cancel, a batch's expiry).

Why from the store: every end goes through the transition script, which hands back the
record's facts in the same atomic step (core.job_store), so no path can end a job without its
line and no line needs another read. Prompt and output text stay out unless
`Settings.audit_content` turns them on: an audit trail is kept longer and read by more
people than the jobs themselves.
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core import lanes
from schemas.openai import ChatCompletion

logger = logging.getLogger("inferq.audit")


@dataclass(frozen=True)
class Finished:
    """What the transition script returns for a job it ended."""

    job_id: str
    status: str
    lane: str
    created_at: float
    started_at: float | None
    finished_at: float
    attempts: int
    #: the API key's owner id (`key_<hash prefix>`, as `inferq keys create` prints it)
    key: str
    model: str
    batch_id: str

    @classmethod
    def from_reply(cls, job_id: str, status: str, finished_at: float, fields: list[str]) -> Finished:
        lane, created, started, attempts, key, model, batch_id = fields
        return cls(
            job_id=job_id,
            status=status,
            lane=lanes.parts(lane)[0],  # the queue, as the job shows it; the model is a field
            created_at=float(created),
            started_at=float(started) if started else None,
            finished_at=finished_at,
            attempts=int(attempts or 0),
            key=key,
            model=model,
            batch_id=batch_id,
        )


def line(
    done: Finished,
    result: ChatCompletion | None,
    error_code: str = "",
    content: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The audit record of one finished job."""
    usage = result.usage if result is not None else None
    started = done.started_at
    out: dict[str, Any] = {
        "event": "job_finished",
        "at": round(done.finished_at, 3),
        "job_id": done.job_id,
        "key": done.key or None,
        "model": done.model,
        "lane": done.lane,
        "status": done.status,
        "batch_id": done.batch_id or None,
        "prompt_tokens": usage.prompt_tokens if usage else 0,
        "completion_tokens": usage.completion_tokens if usage else 0,
        "queue_wait_s": round((started or done.finished_at) - done.created_at, 4),
        "run_s": round(done.finished_at - started, 4) if started is not None else 0.0,
        "attempts": done.attempts,
    }
    if error_code:
        out["error_code"] = error_code
    if content is not None:
        out.update(content)
    return out


class AuditLog:
    """Writes the lines: to the `inferq.audit` logger (default), to a file, or nowhere."""

    def __init__(self, target: str = "log", content: bool = False) -> None:
        self.target = target
        self.content = content
        self._lock = threading.Lock()
        self._path = None if target in ("log", "off", "") else Path(target)
        if self._path is not None:
            self._path.parent.mkdir(parents=True, exist_ok=True)

    @property
    def enabled(self) -> bool:
        return self.target not in ("off", "")

    def write(self, record: dict[str, Any]) -> None:
        text = json.dumps(record, separators=(",", ":"), ensure_ascii=False)
        if self._path is None:
            logger.info("%s", text)
            return
        try:
            with self._lock, self._path.open("a", encoding="utf-8") as f:
                f.write(text + "\n")
        except OSError as exc:  # a full disk must not fail the job that just finished
            logger.error("could not write the audit log %s: %s", self._path, exc)
