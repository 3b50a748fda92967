"""Files: streamed upload with line-by-line checks, metadata in Redis, bytes in storage."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Literal, cast

import anyio
import redis.asyncio as aredis
from fastapi import UploadFile

from api.errors import APIError
from core import keys
from core.config import Settings
from core.storage import Storage, check_id
from schemas.batches import FileObject

_CHUNK = 1 << 16
#: file records read per round trip while listing
_LIST_CHUNK = 200


def new_file_id() -> str:
    return f"file-{uuid.uuid4().hex}"


def valid_id(file_id: str) -> str:
    try:
        return check_id(file_id)
    except ValueError:
        raise APIError(
            404,
            f"No file with id '{file_id[:80]}'.",
            param="file_id",
            code="file_not_found",
            type_="not_found_error",
        ) from None


def _copy_and_count(src: UploadFile, storage: Storage, file_id: str, settings: Settings) -> tuple[int, int]:
    """Copies in chunks (memory stays flat whatever the file size), counting bytes and
    non-empty lines, and checks that it is JSONL at all: the first line must be a JSON object."""
    size = lines = 0
    first: bytes | None = None
    pending = b""
    with storage.writer(file_id) as out:
        while chunk := src.file.read(_CHUNK):
            size += len(chunk)
            if size > settings.max_file_bytes:
                raise APIError(
                    413,
                    f"File is over the limit of {settings.max_file_bytes} bytes.",
                    param="file",
                    code="file_too_large",
                )
            out.write(chunk)
            pending += chunk
            *complete, pending = pending.split(b"\n")
            for line in complete:
                if line.strip():
                    lines += 1
                    first = first if first is not None else line
            if lines > settings.max_file_lines:
                raise APIError(
                    400,
                    f"File has more than {settings.max_file_lines} lines.",
                    param="file",
                    code="too_many_lines",
                )
            if len(pending) > settings.max_line_bytes:
                raise APIError(
                    400,
                    f"Line {lines + 1} is longer than {settings.max_line_bytes} bytes.",
                    param="file",
                    code="line_too_long",
                )
        if pending.strip():
            lines += 1
            first = first if first is not None else pending
    if lines == 0:
        raise APIError(
            400,
            "File is empty: a batch file needs one JSON request per line.",
            param="file",
            code="empty_file",
        )
    if lines > settings.max_file_lines:
        raise APIError(
            400, f"File has more than {settings.max_file_lines} lines.", param="file", code="too_many_lines"
        )
    try:
        ok = isinstance(json.loads(cast(bytes, first)), dict)
    except (ValueError, UnicodeDecodeError):
        ok = False
    if not ok:
        raise APIError(
            400,
            "File is not JSONL: its first line is not a JSON object.",
            param="file",
            code="invalid_file_format",
        )
    return size, lines


async def upload(
    r: aredis.Redis, storage: Storage, settings: Settings, file: UploadFile, purpose: str, owner: str = ""
) -> FileObject:
    if purpose != "batch":
        raise APIError(
            400,
            f"Invalid value for 'purpose': '{purpose}'; only 'batch' is supported.",
            param="purpose",
            code="invalid_value",
        )
    file_id = new_file_id()
    try:
        size, lines = await anyio.to_thread.run_sync(_copy_and_count, file, storage, file_id, settings)
    except BaseException:
        storage.delete(file_id)
        raise
    return await register(r, settings, file_id, file.filename or "upload.jsonl", "batch", size, lines, owner)


async def register(
    r: aredis.Redis,
    settings: Settings,
    file_id: str,
    filename: str,
    purpose: str,
    size: int,
    lines: int,
    owner: str = "",
) -> FileObject:
    now = int(time.time())
    obj = FileObject(
        id=file_id,
        bytes=size,
        created_at=now,
        filename=filename,
        purpose=purpose,
        expires_at=now + settings.file_ttl_s,
    )
    await r.hset(
        keys.file(file_id), mapping={"json": obj.model_dump_json(), "lines": str(lines), "owner": owner}
    )
    await r.expire(keys.file(file_id), settings.file_ttl_s)
    # scored to the microsecond: files made in the same second still list newest first
    await r.zadd(keys.FILE_INDEX, {file_id: time.time()})
    await r.expire(keys.FILE_INDEX, settings.file_ttl_s)
    return obj


async def get(r: aredis.Redis, file_id: str, scope: str | None = None) -> tuple[FileObject, int]:
    """`scope`: the caller's owner id with keys configured (another key's file is a 404)."""
    raw = await r.hgetall(keys.file(valid_id(file_id)))
    if not raw or (scope is not None and raw.get("owner", "") != scope):
        raise APIError(
            404,
            f"No file with id '{file_id}'.",
            param="file_id",
            code="file_not_found",
            type_="not_found_error",
        )
    return FileObject.model_validate_json(raw["json"]), int(raw.get("lines", "0"))


@dataclass(frozen=True)
class FilePage:
    data: list[FileObject]
    #: whether a file matching the same filters follows the page's last
    has_more: bool


async def _rank(r: aredis.Redis, file_id: str, desc: bool) -> int | None:
    return cast(int | None, await (r.zrevrank if desc else r.zrank)(keys.FILE_INDEX, file_id))


async def _start(r: aredis.Redis, after: str | None, desc: bool, scope: str | None) -> int:
    """Where the page after `after` starts. Another key's file is as unknown as a missing one."""
    if not after:
        return 0
    rank = await _rank(r, after, desc)
    owner = await r.hget(keys.file(after), "owner")
    if rank is None or owner is None or (scope is not None and owner != scope):
        raise APIError(
            400,
            f"No file '{after[:80]}' to list after (unknown or expired).",
            param="after",
            code="invalid_value",
        )
    return rank + 1


async def _live(r: aredis.Redis, ids: list[str]) -> list[tuple[str, str, str]]:
    """(id, record JSON, owner) of the files among `ids` that still exist. An id whose record has
    expired (files have a TTL; the index only as a whole) leaves the index here."""
    async with r.pipeline(transaction=False) as pipe:
        for file_id in ids:
            pipe.hmget(keys.file(file_id), ["json", "owner"])
        rows = await pipe.execute()
    stale = [file_id for file_id, (raw, _) in zip(ids, rows, strict=True) if raw is None]
    if stale:
        await r.zrem(keys.FILE_INDEX, *stale)
    return [(i, raw, owner or "") for i, (raw, owner) in zip(ids, rows, strict=True) if raw is not None]


def _visible(rows: list[tuple[str, str, str]], scope: str | None, purpose: str | None) -> list[FileObject]:
    """The files the caller may see (its own when keys are on), of `purpose` if given."""
    objs = [FileObject.model_validate_json(raw) for _, raw, owner in rows if scope in (None, owner)]
    return [o for o in objs if purpose is None or o.purpose == purpose]


async def _next(r: aredis.Redis, rows: list[tuple[str, str, str]], pos: int, desc: bool) -> int:
    """Where the next chunk starts: after the last live id's rank now, not at `pos + chunk`, as
    uploads, deletes and the pruning of expired ids meanwhile shift ranks (a file would be
    repeated or skipped)."""
    last = await _rank(r, rows[-1][0], desc) if rows else None
    return pos + len(rows) if last is None else last + 1


async def list_files(
    r: aredis.Redis,
    limit: int,
    scope: str | None = None,
    *,
    after: str | None = None,
    order: Literal["asc", "desc"] = "desc",
    purpose: str | None = None,
) -> FilePage:
    """One page of files by `created_at` (ties by id), as OpenAI's list: `has_more` is true only
    when a matching file follows, so a client that pages until it is false (the `openai` SDK's
    auto-paging) sees every file once. It reads one file past the page to know."""
    desc = order == "desc"
    pos = await _start(r, after, desc, scope)
    chunk = min(_LIST_CHUNK, limit + 1)
    found: list[FileObject] = []
    while len(found) <= limit:
        ids = cast(
            list[str],
            await (r.zrevrange if desc else r.zrange)(keys.FILE_INDEX, pos, pos + chunk - 1),
        )
        if not ids:
            break
        rows = await _live(r, ids)
        found += _visible(rows, scope, purpose)
        pos = await _next(r, rows, pos, desc)
    return FilePage(found[:limit], len(found) > limit)


async def content(
    r: aredis.Redis, storage: Storage, file_id: str, scope: str | None = None
) -> AsyncIterator[bytes]:
    await get(r, file_id, scope)
    if not storage.exists(file_id):
        raise APIError(
            404,
            f"The bytes of file '{file_id}' are gone.",
            param="file_id",
            code="file_not_found",
            type_="not_found_error",
        )

    async def stream() -> AsyncIterator[bytes]:
        with storage.reader(file_id) as fh:
            while data := await anyio.to_thread.run_sync(fh.read, _CHUNK):
                yield data

    return stream()


async def delete(r: aredis.Redis, storage: Storage, file_id: str, scope: str | None = None) -> None:
    await get(r, file_id, scope)
    await r.delete(keys.file(file_id))
    await r.zrem(keys.FILE_INDEX, file_id)
    storage.delete(file_id)
