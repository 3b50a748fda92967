"""Upload checks on a real local storage, with small limits."""

import io
from pathlib import Path

import pytest
from fastapi import UploadFile

from api.errors import APIError
from api.file_store import _copy_and_count
from core.config import Settings
from core.storage import LocalStorage, check_id


def _upload(data: bytes) -> UploadFile:
    return UploadFile(io.BytesIO(data), filename="f.jsonl")


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (b"", "empty_file"),
        (b"\n\n  \n", "empty_file"),
        (b"a,b,c\n", "invalid_file_format"),
        (b'"just a string"\n', "invalid_file_format"),
        (b"\xff\xfe{}\n", "invalid_file_format"),
        (b"{}\n" * 6, "too_many_lines"),
        (b"{}" + b" " * 200 + b"\n", "file_too_large"),
    ],
)
def test_file_level_rejections(tmp_path: Path, data: bytes, code: str) -> None:
    settings = Settings(max_file_lines=5, max_file_bytes=100)
    with pytest.raises(APIError) as info:
        _copy_and_count(_upload(data), LocalStorage(tmp_path), "file-abcdef12", settings)
    assert info.value.code == code and info.value.param == "file"


def test_counts_lines_and_bytes_in_chunks(tmp_path: Path) -> None:
    data = b'{"custom_id": "1"}\n\n{"custom_id": "2"}'  # blank line ignored, no final newline
    size, lines = _copy_and_count(_upload(data), LocalStorage(tmp_path), "file-abcdef12", Settings())
    assert (size, lines) == (len(data), 2)
    assert (tmp_path / "file-abcdef12").read_bytes() == data


@pytest.mark.parametrize("bad", ["../etc/passwd", "file-../../x", "file-a", "/abs", "file-abc/def12345"])
def test_file_ids_cannot_escape_storage(bad: str) -> None:
    with pytest.raises(ValueError):
        check_id(bad)


def test_extremely_long_line_is_refused_without_buffering_the_file(tmp_path: Path) -> None:
    settings = Settings(max_line_bytes=1000, max_file_bytes=10**7)
    data = b'{"custom_id": "a"}\n' + b'{"x": "' + b"y" * 200_000 + b'"}\n'
    with pytest.raises(APIError) as info:
        _copy_and_count(_upload(data), LocalStorage(tmp_path), "file-abcdef12", settings)
    assert info.value.code == "line_too_long" and "Line 2" in info.value.message


def test_batch_lines_survive_splitlines() -> None:
    from core import batch_lines

    text = "odd\u2028line\x85breaks\x1d\u00e9"
    line = batch_lines.success("c1", "job_1", {"choices": [{"message": {"content": text}}]})
    assert line.isascii() and len(line.splitlines()) == 1
    assert __import__("json").loads(line)["response"]["body"]["choices"][0]["message"]["content"] == text
