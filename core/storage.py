"""File bytes behind a small interface: a local directory today, an S3-compatible store later.

Why only these calls: the batch logic needs to write a file in chunks, read it back as a
stream, know its size and delete it; anything an object store can do cheaply.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO, Protocol

_ID = re.compile(r"^file-[A-Za-z0-9]{8,64}$")


class Storage(Protocol):
    def writer(self, file_id: str) -> BinaryIO: ...

    def reader(self, file_id: str) -> BinaryIO: ...

    def iter_bytes(self, file_id: str, chunk: int = 1 << 16) -> Iterator[bytes]: ...

    def size(self, file_id: str) -> int: ...

    def exists(self, file_id: str) -> bool: ...

    def delete(self, file_id: str) -> None: ...


def check_id(file_id: str) -> str:
    """File ids become paths: only our own id shape is ever allowed (no traversal)."""
    if not _ID.match(file_id):
        raise ValueError(f"invalid file id {file_id!r}")
    return file_id


class LocalStorage:
    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def _path(self, file_id: str) -> Path:
        return self.root / check_id(file_id)

    def writer(self, file_id: str) -> BinaryIO:
        return self._path(file_id).open("wb")

    def reader(self, file_id: str) -> BinaryIO:
        return self._path(file_id).open("rb")

    def iter_bytes(self, file_id: str, chunk: int = 1 << 16) -> Iterator[bytes]:
        with self.reader(file_id) as fh:
            while data := fh.read(chunk):
                yield data

    def size(self, file_id: str) -> int:
        return self._path(file_id).stat().st_size

    def exists(self, file_id: str) -> bool:
        return self._path(file_id).exists()

    def delete(self, file_id: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._path(file_id))
