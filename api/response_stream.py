"""A response's stream events (`response.created` ... `response.completed`), each with its
`sequence_number`, made from its job's event stream.

Why rebuilt on every read instead of stored: the events are a pure function of the job's
events (status changes, token deltas, the final result), so numbering them from the start
each time gives the same numbers to the same events, whichever API process reads and
however often. A client that lost its stream reads again with `starting_after`, after a
disconnect or an API restart alike, and nothing but the job's stream is kept.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from api.chunks import ChoiceStream
from api.deps import AppState
from api.responses import Stored, load
from api.streams import Event, read_events
from schemas.responses import call_item, message_item, message_item_id, output_items, output_text_part

_ENDS = {"completed": "response.completed", "incomplete": "response.incomplete", "failed": "response.failed"}


class ResponseEvents:
    """The events of one response, numbered from 0, fed its job's events in order."""

    def __init__(self, stored: Stored) -> None:
        self.stored = stored
        self.job_id = stored.record.job.id
        self.seq = 0
        self.view = ChoiceStream(0, stored.record.request.calls_tools)
        self.started = False
        self.opened = False

    def _event(self, type_: str, **payload: Any) -> dict[str, Any]:
        event = {"type": type_, "sequence_number": self.seq, **payload}
        self.seq += 1
        return event

    def _snapshot(self, status: str) -> dict[str, Any]:
        """The response as a stream's opening events show it: nothing generated yet."""
        obj = self.stored.object().model_dump()
        obj.update(
            status=status, output=[], usage=None, error=None, incomplete_details=None, completed_at=None
        )
        return obj

    def opening(self) -> list[dict[str, Any]]:
        out = [self._event("response.created", response=self._snapshot("queued"))]
        if self.stored.meta["echo"].get("background"):
            out.append(self._event("response.queued", response=self._snapshot("queued")))
        return out

    def _open_message(self) -> list[dict[str, Any]]:
        self.opened = True
        item = message_item(self.job_id, None, "in_progress")
        return [
            self._event("response.output_item.added", output_index=0, item=item),
            self._event(
                "response.content_part.added",
                item_id=item["id"],
                output_index=0,
                content_index=0,
                part=output_text_part(""),
            ),
        ]

    def _delta(self, text: str) -> dict[str, Any]:
        return self._event(
            "response.output_text.delta",
            item_id=message_item_id(self.job_id),
            output_index=0,
            content_index=0,
            delta=text,
            logprobs=[],
        )

    def feed(self, event: Event) -> list[dict[str, Any]]:
        """The response events one job event makes (none for most status events)."""
        if event.type == "status" and event.fields.get("status") == "running" and not self.started:
            self.started = True
            return [self._event("response.in_progress", response=self._snapshot("in_progress"))]
        if event.type == "token" and int(event.fields.get("index", 0)) == 0:
            text = self.view.delta(event.fields.get("text", ""))
            if not text:
                return []
            return [*([] if self.opened else self._open_message()), self._delta(text)]
        return []

    def ending(self, stored: Stored) -> list[dict[str, Any]]:
        """The last events, from the response as it ended: the rest of the text and the
        function calls (known only once the answer is complete), then its end."""
        out: list[dict[str, Any]] = []
        result = stored.result()
        if result is not None and result.choices:
            items = output_items(self.job_id, result)
            for index, item in enumerate(items):
                if item["type"] == "message":
                    out += self._finish_message(item, index)
                else:
                    out += self._call_events(item, index)
        obj = stored.object().model_dump()
        kind = _ENDS.get(obj["status"], f"response.{obj['status']}")
        out.append(self._event(kind, response=obj))
        return out

    def _finish_message(self, item: dict[str, Any], index: int) -> list[dict[str, Any]]:
        text = item["content"][0]["text"] if item["content"] else ""
        out = [] if self.opened else self._open_message()
        if text.startswith(self.view.sent) and len(text) > len(self.view.sent):
            out.append(self._delta(text[len(self.view.sent) :]))
        ids = {"item_id": item["id"], "output_index": index}
        out.append(self._event("response.output_text.done", **ids, content_index=0, text=text, logprobs=[]))
        out.append(
            self._event("response.content_part.done", **ids, content_index=0, part=output_text_part(text))
        )
        out.append(self._event("response.output_item.done", output_index=index, item=item))
        return out

    def _call_events(self, item: dict[str, Any], index: int) -> list[dict[str, Any]]:
        k = int(item["id"].rsplit("_", 1)[1])
        opening = call_item(self.job_id, k, item["call_id"], item["name"], "", "in_progress")
        ids = {"item_id": item["id"], "output_index": index}
        return [
            self._event("response.output_item.added", output_index=index, item=opening),
            self._event("response.function_call_arguments.delta", **ids, delta=item["arguments"]),
            self._event("response.function_call_arguments.done", **ids, arguments=item["arguments"]),
            self._event("response.output_item.done", output_index=index, item=item),
        ]


def sse(event: dict[str, Any]) -> str:
    return f"event: {event['type']}\ndata: {json.dumps(event)}\n\n"


async def stream_events(st: AppState, stored: Stored, starting_after: int = -1) -> AsyncIterator[str]:
    """The response's events after `starting_after`, as SSE, to its end."""
    events = ResponseEvents(stored)
    keep_alive_ms = int(st.settings.sse_block_s * 1000)

    def after(batch: list[dict[str, Any]]) -> str:
        return "".join(sse(e) for e in batch if e["sequence_number"] > starting_after)

    if out := after(events.opening()):
        yield out
    async for event in read_events(st.stream_redis, events.job_id, "0-0", keep_alive_ms):
        if event is None:
            yield ": keep-alive\n\n"
        elif event.type in ("done", "error", "cancelled"):
            if out := after(events.ending(await load(st, stored.id, None))):
                yield out
            return
        elif out := after(events.feed(event)):
            yield out
