"""A fake engine behind the real interface, for plumbing tests and the queue-floor bench.

It answers at once with the last user message, so what remains measurable is the cost of
the queue itself. Magic prompts trigger failure modes on purpose.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence

from models.prompts import WordCounter
from workers.engine import FinishReason, GenRequest, GenResult, TokenSink, run_split
from workers.streaming import StopFilter

#: A user message equal to this makes the request fail (engine error, worker survives).
FAIL_TRIGGER = "__inferq_fail__"
#: A user message equal to this hangs generation forever (what the stall watchdog is for).
STALL_TRIGGER = "__inferq_stall__"
#: A user message equal to this takes one second (while making progress): a busy worker.
SLOW_TRIGGER = "__inferq_slow__"
#: A user message equal to this kills the worker process (a poison request).
CRASH_TRIGGER = "__inferq_crash__"


class OutOfMemoryError(RuntimeError):
    """Stands in for torch.cuda.OutOfMemoryError."""


class EchoEngine(WordCounter):
    def __init__(self, model_id: str, context_length: int = 4096, oom_above: int = 0) -> None:
        super().__init__(model_id, context_length)
        self.oom_above = oom_above
        self.calls: list[int] = []
        self._progress: float | None = None
        self._tokens = 0

    def progress(self) -> float | None:
        return self._progress

    def generated_tokens(self) -> int:
        return self._tokens

    def generate(
        self, requests: Sequence[GenRequest], sink: TokenSink | None = None
    ) -> list[GenResult | Exception]:
        self._progress = time.monotonic()
        try:
            return run_split(
                lambda idxs: self._batch(requests, idxs, sink),
                list(range(len(requests))),
                sink.on_reset if sink is not None else None,
            )
        finally:
            self._progress = None

    def _batch(
        self, requests: Sequence[GenRequest], idxs: list[int], sink: TokenSink | None
    ) -> list[GenResult | Exception]:
        self.calls.append(len(idxs))
        if self.oom_above and len(idxs) > self.oom_above:
            raise OutOfMemoryError(
                f"CUDA out of memory (echo engine: call of {len(idxs)} rows > {self.oom_above})"
            )
        return [self._one(requests[i], i, sink) for i in idxs]

    def _one(self, req: GenRequest, i: int, sink: TokenSink | None) -> GenResult | Exception:
        prompt = req.messages[-1]["content"]
        if prompt == CRASH_TRIGGER:
            os._exit(13)
        while prompt == STALL_TRIGGER:
            time.sleep(1)  # no progress is ever reported
        for _ in range(10 if prompt == SLOW_TRIGGER else 0):
            time.sleep(0.1)
            self._progress = time.monotonic()
        if prompt == FAIL_TRIGGER:
            return RuntimeError("echo engine: failure requested by the prompt")
        words = prompt.split()
        n = min(len(words), req.params.max_tokens)
        filt = StopFilter(req.params.stop)
        for k, word in enumerate(words[:n]):
            if sink is not None and sink.should_stop(i):
                break
            self._progress = time.monotonic()
            self._tokens += 1
            delta = filt.feed(word if k == 0 else " " + word)
            if sink is not None:
                sink.on_delta(i, delta)
        tail = filt.finish()
        if sink is not None:
            sink.on_delta(i, tail)
            sink.flush()
        finish: FinishReason = "stop" if filt.stopped or n == len(words) else "length"
        return GenResult(filt.text, finish, self.count_prompt_tokens(req.messages), n)
