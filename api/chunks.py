"""The `chat.completion.chunk`s of one streamed choice: content as its tokens come, and, once
the job is done, what only the finished answer knows (tool calls, logprobs, the finish).

Why tool calls and logprobs at the end: the worker streams text deltas, coalesced every few
milliseconds, and a tool call is known to be one only once its JSON parses (vLLM's hermes
parser has the same wait). Text that may be the start of a `<tool_call>` is held back, so a
client never shows the tags as content; the calls then come as OpenAI streams them: per
call its `index`, `id`, `type` and name once, then argument fragments. Logprobs come in one
chunk with the finish, all of them in order (clients concatenate `logprobs.content`).
"""

from __future__ import annotations

from collections.abc import Iterator

from schemas.openai import Choice, ChunkChoice, ChunkDelta
from schemas.structured import ChunkFunction, ChunkToolCall
from schemas.tool_calls import ContentFilter

#: characters per argument fragment of a streamed tool call
ARGUMENT_FRAGMENT = 24


class ChoiceStream:
    """One choice's content deltas, held back while they may be a tool call's tags."""

    def __init__(self, index: int, calls_tools: bool) -> None:
        self.index = index
        self.filter = ContentFilter() if calls_tools else None
        #: the content sent so far
        self.sent = ""

    def delta(self, text: str) -> str:
        out = self.filter.feed(text) if self.filter is not None else text
        self.sent += out
        return out

    def final(self, choice: Choice) -> Iterator[ChunkChoice]:
        """The rest of the content, the tool calls, the logprobs and the finish."""
        content = choice.message.content or ""
        if content.startswith(self.sent) and len(content) > len(self.sent):
            yield ChunkChoice(index=self.index, delta=ChunkDelta(content=content[len(self.sent) :]))
        for k, call in enumerate(choice.message.tool_calls or []):
            head = ChunkToolCall(
                index=k,
                id=call.id,
                type="function",
                function=ChunkFunction(name=call.function.name, arguments=""),
            )
            yield ChunkChoice(index=self.index, delta=ChunkDelta(tool_calls=[head]))
            args = call.function.arguments
            for start in range(0, len(args), ARGUMENT_FRAGMENT):
                piece = ChunkToolCall(
                    index=k, function=ChunkFunction(arguments=args[start : start + ARGUMENT_FRAGMENT])
                )
                yield ChunkChoice(index=self.index, delta=ChunkDelta(tool_calls=[piece]))
        reason = "stop" if choice.finish_reason == "cancelled" else choice.finish_reason
        yield ChunkChoice(
            index=self.index, delta=ChunkDelta(), finish_reason=reason, logprobs=choice.logprobs
        )
