"""A tiny SSE client for tests: parses `id`, `event`, `data` blocks, skips comments."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx


@dataclass
class SSE:
    id: str
    event: str
    data: Any


def iter_sse(resp: httpx.Response) -> Iterator[SSE]:
    fields: dict[str, str] = {}
    data: list[str] = []
    for line in resp.iter_lines():
        if line == "":
            if data:
                raw = "\n".join(data)
                parsed = raw if raw == "[DONE]" else json.loads(raw)
                yield SSE(fields.get("id", ""), fields.get("event", "message"), parsed)
            fields, data = {}, []
        elif line.startswith(":"):
            continue
        else:
            key, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if key == "data":
                data.append(value)
            else:
                fields[key] = value


def read_job_events(base_url: str, job_id: str, last_event_id: str | None = None) -> list[SSE]:
    headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
    out = []
    with httpx.stream("GET", f"{base_url}/v1/jobs/{job_id}/events", headers=headers, timeout=60) as resp:
        assert resp.status_code == 200, resp.read()
        assert resp.headers["content-type"].startswith("text/event-stream")
        for ev in iter_sse(resp):
            out.append(ev)
            if ev.event in ("done", "error", "cancelled"):
                break
    return out


def final_text(events: list[SSE], index: int = 0) -> str:
    """Concatenated token deltas of one choice after the last reset."""
    text = ""
    for ev in events:
        if ev.event == "reset" and str(ev.data.get("index", index)) == str(index):
            text = ""
        elif ev.event == "token" and ev.data["index"] == index:
            text += ev.data["text"]
    return text
