"""The house hooks the `extras_stack` runs (`INFERQ_HOOKS='["tests.support.hooks:house"]'`).

They act only on requests whose last user message holds one of the marker words below, so
the other tests that share the stack (webhooks) see their requests untouched.
"""

from __future__ import annotations

from models.hooks import Refusal
from schemas.openai import AssistantMessage, ChatCompletion, ChatCompletionRequest

#: `before` refuses a request holding it (a "sensitive word")
REFUSE = "HOUSE-FORBIDDEN"
#: `before` raises on it (a hook that broke in the API)
BREAK_BEFORE = "HOUSE-BREAK-BEFORE"
#: `after` replaces every choice's content with REDACTED
REWRITE = "HOUSE-REWRITE"
#: `after` raises on it (a hook that broke in the worker)
BREAK_AFTER = "HOUSE-BREAK-AFTER"
#: `after` refuses the result
VETO = "HOUSE-VETO"

REFUSAL_MESSAGE = "The house does not discuss that."
REDACTED = "[redacted by the house]"


def _last_user_text(request: ChatCompletionRequest) -> str:
    return next((m.text() for m in reversed(request.messages) if m.role == "user"), "")


class House:
    """A sensitive-word filter before, a redaction after (the article's two examples)."""

    def before(self, request: ChatCompletionRequest) -> ChatCompletionRequest | Refusal:
        text = _last_user_text(request)
        if REFUSE in text:
            return Refusal(REFUSAL_MESSAGE)
        if BREAK_BEFORE in text:
            raise ValueError("the house filter broke on purpose")
        return request

    def after(self, request: ChatCompletionRequest, result: ChatCompletion) -> ChatCompletion:
        text = _last_user_text(request)
        if BREAK_AFTER in text:
            raise RuntimeError("the house redactor broke on purpose")
        if VETO in text:
            raise Refusal("The house withholds this answer.")
        if REWRITE in text:
            choices = [
                c.model_copy(update={"message": AssistantMessage(content=REDACTED), "finish_reason": "stop"})
                for c in result.choices
            ]
            return result.model_copy(update={"choices": choices})
        return result


house = House()
