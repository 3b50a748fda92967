"""A batch whose finalization keeps failing (its storage cannot write) is tried again with an
exponential backoff of its own, each cause logged once, and finishes once storage works: the
API's real dispatcher, on a real Valkey, driven as the API drives it (`ensure_dispatcher`).

Backoff 0.2 s doubling up to 0.8 s here (5 s up to 5 min in the product): the time between
tries is what is under test."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import BinaryIO, cast

import pytest
import redis.asyncio as aredis

from api.batch_dispatch import BatchService
from api.fleet import CounterHolder, Fleet
from core import keys
from core.config import Settings
from core.job_store import AsyncJobStore
from core.storage import LocalStorage
from tasks.app import app as celery_app
from tests.support.stack import fresh_db
from tests.support.wait import eventually_async

BASE, CAP = 0.2, 0.8
LOGGER = "api.batch_dispatch"


class FlakyDisk(LocalStorage):
    """Local storage whose writes fail with `error` while it is set."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.error: OSError | None = OSError(28, "No space left on device")
        self.tries: list[float] = []  # time.monotonic() of each write that failed

    def writer(self, file_id: str) -> BinaryIO:
        if self.error is not None:
            self.tries.append(time.monotonic())
            raise self.error
        return super().writer(file_id)


@pytest.fixture()
async def service(redis_url: str, tmp_path: Path) -> AsyncIterator[tuple[BatchService, FlakyDisk]]:
    # db 2: apart from every stack (the main one is on db 15 in CI's second run)
    client = aredis.Redis.from_url(fresh_db(redis_url, 2), decode_responses=True)
    settings = Settings(home=tmp_path)
    disk = FlakyDisk(settings.files_path)
    fleet = Fleet(client, settings, CounterHolder(settings))  # never asked: no line is dispatched
    svc = BatchService(client, AsyncJobStore(client, 3600), disk, settings, celery_app, fleet)
    svc.finalize_retry_s, svc.finalize_retry_max_s = BASE, CAP
    resumer = asyncio.get_running_loop().create_task(svc.resume_all())  # as the API runs it
    yield svc, disk
    resumer.cancel()
    await svc.stop()
    await client.aclose()


async def _has_status(r: aredis.Redis, batch_id: str, status: str) -> bool:
    return bool(await r.hget(keys.batch(batch_id), "status") == status)


async def _batch_with_every_line_done(r: aredis.Redis, batch_id: str, status: str = "in_progress") -> None:
    """A batch as its jobs leave it: every line done, one output line and one error line."""
    now = int(time.time())
    fields = {
        "id": batch_id,
        "endpoint": "/v1/chat/completions",
        "input_file_id": "file-input0000",
        "completion_window": "24h",
        "status": status,
        "created_at": str(now),
        "in_progress_at": str(now),
        "expires_at": str(now + 3600),
        "total": "2",
        "completed": "1",
        "failed": "1",
        "done_lines": "2",
        "dispatched": "2",
        "dispatch_done": "1",
        "cursor": "0",
        "line_no": "2",
        "owner": "",
    }
    await r.hset(keys.batch(batch_id), mapping=fields)  # type: ignore[arg-type]
    await r.rpush(keys.batch_output(batch_id), f'{{"custom_id": "{batch_id}-ok"}}')
    await r.rpush(keys.batch_errors(batch_id), f'{{"custom_id": "{batch_id}-failed"}}')
    await r.sadd(keys.ACTIVE_BATCHES, batch_id)


def _failures(caplog: pytest.LogCaptureFixture, batch_id: str) -> list[logging.LogRecord]:
    """The dispatcher's records of failed finalizations of `batch_id` (one per try)."""
    return [
        rec
        for rec in caplog.records
        if rec.name == LOGGER
        and isinstance(rec.args, tuple)
        and rec.args[:1] == (batch_id,)
        and "finaliz" in rec.msg
    ]


async def test_a_finalization_that_keeps_failing_backs_off_logs_each_cause_once_and_completes(
    service: tuple[BatchService, FlakyDisk], caplog: pytest.LogCaptureFixture
) -> None:
    svc, disk = service
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    await _batch_with_every_line_done(svc.r, "batch_full_disk")
    svc.ensure_dispatcher("batch_full_disk")

    await eventually_async(lambda: len(disk.tries) >= 5, message="5 tries")
    gaps = [b - a for a, b in itertools.pairwise(disk.tries)][:4]
    for gap, delay in zip(gaps, [0.2, 0.4, 0.8, 0.8], strict=True):  # doubling, capped
        assert delay <= gap < delay + 0.5, (gaps, disk.tries)
    assert (await svc.r.hget(keys.batch("batch_full_disk"), "status")) == "finalizing"
    failures = _failures(caplog, "batch_full_disk")
    loud = [rec for rec in failures if rec.levelno >= logging.INFO]
    assert len(loud) == 1 and loud[0].levelno == logging.ERROR, [r.getMessage() for r in failures]
    assert loud[0].exc_info is not None  # the traceback, once
    assert "OSError: [Errno 28] No space left on device" in loud[0].getMessage()
    assert all(rec.levelno == logging.DEBUG and rec.exc_info is None for rec in failures[1:])

    # another cause is news: said once too
    tries = len(disk.tries)
    disk.error = PermissionError(13, "Read-only file system")
    await eventually_async(lambda: len(disk.tries) >= tries + 2, message="2 more tries")
    loud = [rec for rec in _failures(caplog, "batch_full_disk") if rec.levelno >= logging.INFO]
    assert len(loud) == 2 and "PermissionError" in loud[1].getMessage(), [r.getMessage() for r in loud]

    disk.error = None
    await eventually_async(
        lambda: _has_status(svc.r, "batch_full_disk", "completed"), timeout=CAP + 5, message="completed"
    )
    raw = cast(dict[str, str], await svc.r.hgetall(keys.batch("batch_full_disk")))
    assert raw["status"] == "completed" and raw["completed_at"], raw
    assert int(raw["finalizing_at"]) <= int(raw["completed_at"])
    with disk.reader(raw["output_file_id"]) as fh:
        assert fh.read() == b'{"custom_id": "batch_full_disk-ok"}\n'
    with disk.reader(raw["error_file_id"]) as fh:
        assert fh.read() == b'{"custom_id": "batch_full_disk-failed"}\n'
    assert not await svc.r.sismember(keys.ACTIVE_BATCHES, "batch_full_disk")
    assert not [rec for rec in caplog.records if "dispatcher for" in rec.getMessage()]  # no crash loop


async def test_each_batch_backs_off_on_its_own_and_a_cancelled_one_ends_cancelled(
    service: tuple[BatchService, FlakyDisk], caplog: pytest.LogCaptureFixture
) -> None:
    """A batch that starts failing while another already waits the longest gets the shortest
    gap itself, and its own first error line; a cancelled batch's retried finalization ends
    it `cancelled` (the retry used to finalize it as `completed`)."""
    svc, disk = service
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    await _batch_with_every_line_done(svc.r, "batch_old")
    svc.ensure_dispatcher("batch_old")
    await eventually_async(lambda: len(_failures(caplog, "batch_old")) >= 4, message="batch_old at the cap")

    await _batch_with_every_line_done(svc.r, "batch_cancelled", status="cancelling")
    svc.ensure_dispatcher("batch_cancelled")
    tried = lambda: len(_failures(caplog, "batch_cancelled")) >= 3  # noqa: E731
    await eventually_async(tried, message="3 tries of batch_cancelled")
    mine = _failures(caplog, "batch_cancelled")
    gaps = [b.created - a.created for a, b in itertools.pairwise(mine)]
    assert BASE <= gaps[0] < BASE + 0.5 and 2 * BASE <= gaps[1] < 2 * BASE + 0.5, gaps
    assert [rec.levelno for rec in mine] == [logging.ERROR, logging.DEBUG, logging.DEBUG]
    raw = cast(dict[str, str], await svc.r.hgetall(keys.batch("batch_cancelled")))
    assert raw["status"] == "finalizing" and raw["finalizing_as"] == "cancelled", raw

    disk.error = None
    for batch_id, final in (("batch_old", "completed"), ("batch_cancelled", "cancelled")):
        done = lambda b=batch_id, f=final: _has_status(svc.r, b, f)  # noqa: E731
        await eventually_async(done, timeout=CAP + 5, message=f"{batch_id} {final}")
    raw = cast(dict[str, str], await svc.r.hgetall(keys.batch("batch_cancelled")))
    assert raw["status"] == "cancelled" and raw["cancelled_at"] and "completed_at" not in raw, raw
