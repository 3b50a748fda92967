"""Tool calls in a model's text (the hermes format: `<tool_call>{"name", "arguments"}</tool_call>`)
to OpenAI's `tool_calls`, for a finished answer and for a stream.

Why our own parser and not ms-swift's: ms-swift parses only after the sequence ends, leaves
the tags in `content` and never says `finish_reason: "tool_calls"`. vLLM's hermes parser is
the reference for what clients expect: the text before the first call is the content (null
when there is none), a call whose JSON does not parse leaves the whole text as content.
"""

from __future__ import annotations

import json
import re
import uuid

from schemas.structured import FunctionCall, ToolCall

OPEN_TAG, CLOSE_TAG = "<tool_call>", "</tool_call>"
_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>|<tool_call>\s*(.*)$", re.DOTALL)


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _call(raw: str) -> ToolCall | None:
    try:
        obj = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    return ToolCall(
        id=new_call_id(),
        function=FunctionCall(name=obj["name"], arguments=json.dumps(args, ensure_ascii=False)),
    )


def parse_tool_calls(text: str) -> tuple[str | None, list[ToolCall]]:
    """(content, calls). No call, or one that does not parse: the text is all content."""
    start = text.find(OPEN_TAG)
    if start < 0:
        return text, []
    calls = []
    for match in _CALL.finditer(text, start):
        call = _call(match.group(1) if match.group(1) is not None else match.group(2))
        if call is None:
            return text, []
        calls.append(call)
    return text[:start].rstrip() or None, calls


class ContentFilter:
    """A stream's content deltas when the answer may hold tool calls: the text before the
    first `<tool_call>`, whose concatenation equals the final `content` (text that may be
    the start of the tag, and trailing whitespace, are held back until more text shows what
    they are)."""

    def __init__(self) -> None:
        self.held = ""
        self.in_call = False

    def feed(self, delta: str) -> str:
        if self.in_call:
            return ""
        self.held += delta
        tag = self.held.find(OPEN_TAG)
        if tag >= 0:
            out, self.held, self.in_call = self.held[:tag].rstrip(), "", True
            return out
        keep = max((k for k in range(1, len(OPEN_TAG)) if self.held.endswith(OPEN_TAG[:k])), default=0)
        body = self.held[: len(self.held) - keep]
        cut = len(body.rstrip())
        out, self.held = self.held[:cut], self.held[cut:]
        return out

    def finish(self, had_calls: bool) -> str:
        """What is still held, once the answer is known: nothing more when it had calls."""
        out = "" if (self.in_call or had_calls) else self.held
        self.held = ""
        return out
