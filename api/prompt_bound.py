"""An upper bound on a conversation's prompt tokens, without tokenizing it.

Why: the exact count runs the model's template and tokenizer in the API on every request
(about half a millisecond for a short chat), and for almost every request it decides
nothing: the prompt fits the context with room to spare. Every token of a byte-level BPE
or SentencePiece vocabulary covers at least one byte of text, so a message costs at most its
content's UTF-8 bytes plus its template markup, which is measured once on empty messages.
Only when this bound does not prove the request fits, or the conversation is not of the
plain shape every chat template takes (`plain_shape`), does the API count exactly: the
count is also what refuses a conversation the template cannot render.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

#: tokens added to each message's measured markup, for merges that differ at the
#: boundary between markup and text
MARGIN = 4

Messages = list[dict[str, Any]]


@dataclass(frozen=True)
class PromptBound:
    base: int
    per_message: int

    @classmethod
    def measure(cls, count: Callable[[Messages], int]) -> PromptBound:
        one = count([{"role": "user", "content": ""}])
        three = count(
            [
                {"role": "user", "content": ""},
                {"role": "assistant", "content": ""},
                {"role": "user", "content": ""},
            ]
        )
        system = count([{"role": "system", "content": ""}, {"role": "user", "content": ""}]) - one
        per_message = max((three - one + 1) // 2, system, 0) + MARGIN
        return cls(base=one + MARGIN, per_message=per_message)

    def __call__(self, messages: Messages) -> int | None:
        """The bound, or None for a conversation only the template can judge."""
        if not plain_shape(messages):
            return None
        return self.base + sum(len(m["content"].encode()) + self.per_message for m in messages)


def plain_shape(messages: Messages) -> bool:
    """An optional system message, then user and assistant turns by turns, ending with the
    user's: the conversation every chat template renders (tool calls and tool answers are
    rendered by the template's agent template: counted exactly)."""
    if any("tool_calls" in m for m in messages):
        return False
    roles = [m["role"] for m in messages]
    if roles and roles[0] == "system":
        roles = roles[1:]
    return len(roles) % 2 == 1 and all(
        r == ("user" if i % 2 == 0 else "assistant") for i, r in enumerate(roles)
    )
