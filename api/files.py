"""Files: streamed upload with line-by-line checks, metadata in Redis, bytes in storage."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import cast

import anyio
import redis.asyncio as aredis
from fastapi import UploadFile

from api.errors import APIError
from core import keys
from core.config import Settings
from core.storage import Storage, check_id
from schemas.batches import FileObject

_CHUNK = 1 << 16


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
    await r.zadd(keys.FILE_INDEX, {file_id: now})
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


async def list_files(r: aredis.Redis, limit: int, scope: str | None = None) -> list[FileObject]:
    ids = await r.zrevrange(keys.FILE_INDEX, 0, -1)
    out = []
    for file_id in cast(list[str], ids):
        raw = await r.hgetall(keys.file(file_id))
        if raw and (scope is None or raw.get("owner", "") == scope):
            out.append(FileObject.model_validate_json(raw["json"]))
            if len(out) >= limit:
                break
    return out


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
