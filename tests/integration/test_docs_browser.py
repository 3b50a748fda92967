"""/docs in a real browser: Debian's chromium loads the page from the running API (no network
beyond it), runs Swagger UI and dumps the DOM it built. A Swagger UI that cannot read the
OpenAPI 3.1 FastAPI emits shows "Unable to render this definition" and no operation; a page
whose assets do not load shows nothing at all. Both fail here."""

from __future__ import annotations

import os
import shutil
from html.parser import HTMLParser
from pathlib import Path

import httpx
import pytest

from tests.support import procs
from tests.support.stack import Stack

_FLAGS = [
    "--headless",
    "--no-sandbox",  # root, in a container
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--virtual-time-budget=10000",  # lets the page's scripts run before the dump
]


class Operations(HTMLParser):
    """(METHOD, path) of every operation Swagger UI drew, from its summary rows."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[tuple[str, str]] = []
        self._method: str | None = None
        self._reading_method = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attr = dict(attrs)
        classes = (attr.get("class") or "").split()
        self._reading_method = "opblock-summary-method" in classes
        if "opblock-summary-path" in classes and self._method is not None:
            self.found.append((self._method, attr.get("data-path") or ""))
            self._method = None

    def handle_data(self, data: str) -> None:
        if self._reading_method:
            self._method = data.strip()
            self._reading_method = False


def _chromium() -> str:
    path = shutil.which("chromium")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is missing; .ci/run installs it (apt-get install chromium)")
        pytest.skip("chromium is not installed (apt-get install chromium); CI runs this test")
    return path


def test_docs_render_every_operation_in_a_browser(echo_stack: Stack, tmp_path: Path) -> None:
    argv = [_chromium(), *_FLAGS, f"--user-data-dir={tmp_path}", "--dump-dom", f"{echo_stack.base_url}/docs"]
    dom = procs.run(argv, capture_output=True, text=True, timeout=120, check=True).stdout
    assert "Unable to render" not in dom
    doc = httpx.get(f"{echo_stack.base_url}/openapi.json", timeout=30).json()
    expected = {(m.upper(), p) for p, item in doc["paths"].items() for m in item}
    drawn = Operations()
    drawn.feed(dom)
    # a set: an operation with two tags (GET /v1/models: health, models) is drawn under each
    assert set(drawn.found) == expected, dom[-3000:]
    summaries = [op["summary"] for item in doc["paths"].values() for op in item.values()]
    missing = [s for s in summaries if s not in dom]
    assert not missing, missing
