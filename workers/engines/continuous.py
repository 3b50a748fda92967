"""Continuous batching: transformers' `ContinuousBatchingManager` behind our `Engine` seam.

Why: a static `generate` call runs until its longest row ends, and takes no row once it has
started. The manager runs a persistent generation loop (paged attention, CUDA graphs on a
GPU): a request joins it at once, and a finished row frees its slot at once.

What we add around the manager, and why:
- per-request settings: the manager samples for the loop as a whole (one `do_sample`), so it
  runs greedy and `SlotSampler`, a logits processor of its own kind, picks each row's token
  by that row's temperature / top-k / top-p, seed and penalties (`workers.engines.rows.sample`), from
  per-slot tables kept on the device: no host round trip per step, and a greedy row's tokens
  are the argmax, as alone;
- streaming, stop sequences and cancels are ours: tokens are decoded in the caller's thread
  (`DeltaStreamer`), a row whose text holds one of its stop sequences is cancelled, and a
  cancelled row ends with what it has (the manager says nothing more about it);
- a manager whose loop died fails the rows it had and is started anew.

What the manager offers beyond its public API (its processor list, output queue, loop
thread) is reached only through `workers.engines.hf_batching`, which checks the transformers
version and those attributes and fails loudly when they are not the ones it knows.

Only the worker child imports this module (torch).
"""

from __future__ import annotations

import copy
import logging
import queue
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from swift.infer_engine import InferRequest
from transformers.generation.configuration_utils import ContinuousBatchingConfig

from core.config import Settings
from models.spec import ModelSpec
from workers.engine import (
    AdapterMissing,
    FinishReason,
    GenParams,
    GenRequest,
    GenResult,
    TokenSink,
    truncate_at_stop,
)
from workers.engines import hf_batching
from workers.engines.rows import stop_window
from workers.engines.slots import SLOT_KWARG, SlotSampler
from workers.engines.swift import DeltaStreamer, SwiftEngine
from workers.options import interactive_reserve

logger = logging.getLogger(__name__)


@dataclass
class _Row:
    row: int  # the sink's row
    rid: str  # the manager's request id
    slot: int
    params: GenParams
    prompt_tokens: int
    template_inputs: Any = None
    #: someone watches its tokens (not a batch line): decode as they come
    stream: bool = True
    tokens: list[int] = field(default_factory=list)


class SwiftContinuousEngine(SwiftEngine):
    """The same model as the static engine, run by a continuous-batching loop. `generate`
    works as the static engine's (warm-up, direct use); the runner's continuous drain uses
    `open` / `add` / `poll` / `cancel` / `close`, so jobs join while others run."""

    mode = "continuous"

    def __init__(self, spec: ModelSpec, settings: Settings) -> None:
        super().__init__(spec, settings)
        self.settings = settings
        self.engine.template.set_mode("transformers")
        self.rows_max = settings.max_batch_size + interactive_reserve(settings.max_batch_size)
        self._slots: deque[int] = deque(range(1, 2 * self.rows_max + 2))
        self._rows: dict[str, _Row] = {}
        self._by_row: dict[int, _Row] = {}
        self._refused: list[tuple[int, Exception]] = []
        self._sink: TokenSink | None = None
        self._streamer: DeltaStreamer | None = None
        self._count = 0
        self._last_output: float | None = None
        self.manager: Any = None
        self.sampler = SlotSampler(
            len(self._slots) + 1, self.engine.model.device, self.grammars.vocab_size, self.stop_token_ids
        )
        self._start_manager()

    def _start_manager(self) -> None:
        gc = copy.deepcopy(self.engine.generation_config)
        # greedy for the loop as a whole: SlotSampler samples each row by its own settings
        gc.do_sample = False
        gc.temperature, gc.top_p, gc.top_k = None, None, None
        # the manager hands processors only the newest tokens, not the sequence so far
        gc.repetition_penalty = None
        gc.eos_token_id = self.stop_token_ids
        gc.max_new_tokens = self.settings.default_max_tokens
        cfg = ContinuousBatchingConfig(
            max_requests_per_batch=self.rows_max,
            per_request_processors=False,
            allow_block_sharing=False,
            **self._cache_size(),
        )
        # the loop in a daemon thread, SlotSampler its logits processor
        self.manager = hf_batching.start_manager(
            self.engine.model, gc, cfg, self.sampler, warmup=self.facts.accelerator
        )

    def shutdown(self) -> None:
        """Stop the loop (what is still running is dropped)."""
        self.manager.stop(block=True, timeout=10, hard_stop=True)

    def _cache_size(self) -> dict[str, Any]:
        s = self.settings
        size: dict[str, Any] = {}
        if s.kv_page_size:
            size["page_size"] = s.kv_page_size
        if s.kv_cache_blocks:
            size["num_blocks"] = s.kv_cache_blocks
        elif not self.facts.accelerator:
            # no GPU memory to size it from: every row at the full context length
            page = s.kv_page_size or 256
            size["page_size"] = page
            size["num_blocks"] = self.rows_max * (-(-self.facts.context_length // page)) + 2
            size["max_batch_tokens"] = max(512, min(4096, self.facts.context_length))
        else:
            size["max_memory_percent"] = 0.8  # room for the sampler's vocabulary-sized tensors
        return size

    # --- the incremental interface (workers.continuous_drain) ----------------------

    def open(self, sink: TokenSink | None) -> None:
        self._sink = sink
        self._streamer = None if sink is None else DeltaStreamer(self.engine.template, sink, [], 0)

    def add(self, row: int, request: GenRequest) -> None:
        """Start a row; a request that cannot start (its prompt does not encode, the loop
        refuses it) ends at the next `poll` with its error, alone."""
        try:
            self._add(row, request)
        except Exception as exc:
            logger.warning("request for row %d could not join the loop: %s", row, exc)
            if (r := self._by_row.get(row)) is not None:
                self._release(r)
            self._refused.append((row, exc))

    def _add(self, row: int, request: GenRequest) -> None:
        if request.adapter:
            raise AdapterMissing(
                f"The adapter '{request.adapter}' cannot run here: LoRA adapters are served by "
                "workers in static mode (INFERQ_ENGINE_MODE=static)."
            )
        enc = self.engine.template.encode(
            InferRequest(messages=request.messages, tools=request.tools), return_template_inputs=True
        )
        input_ids = list(enc["input_ids"])
        # compiled here, in the drain's thread: the loop's steps go on meanwhile
        grammar = request.params.grammar
        matcher = self.grammars.matcher(grammar) if grammar is not None else None
        slot = self._slots.popleft()
        self.sampler.assign(slot, request.params, self._default_top_k, input_ids, matcher)
        self._count += 1
        rid = f"r{self._count}"
        stream = self._sink is not None and self._sink.wants_tokens(row)
        r = _Row(row, rid, slot, request.params, len(input_ids), enc.get("template_inputs"), stream)
        self._rows[rid] = r
        self._by_row[row] = r
        if self._streamer is not None:  # rows are added in order
            while len(self._streamer.ids) < row:
                self._streamer.add_row(())
            if len(self._streamer.ids) == row:
                self._streamer.add_row(request.params.stop)
        if self._last_output is None:
            self._last_output = time.monotonic()
        self.manager.add_request(
            input_ids,
            request_id=rid,
            max_new_tokens=request.params.max_tokens,
            streaming=True,
            eos_token_id=self.stop_token_ids,
            **{SLOT_KWARG: slot},
        )

    def active_rows(self) -> int:
        return len(self._rows)

    def take_step_counts(self) -> tuple[int, int]:
        """(generation steps, rows over those steps) since the last call."""
        steps, rows = self.sampler.steps_run, self.sampler.rows_run
        self.sampler.steps_run = self.sampler.rows_run = 0
        return steps, rows

    def poll(self, timeout_s: float) -> list[tuple[int, GenResult | Exception]]:
        """Rows that ended since the last call (waits up to `timeout_s` for the first output),
        those the sink wants stopped (cancel flag, time limit) included: they end now, with
        what they have."""
        done: list[tuple[int, GenResult | Exception]] = list(self._refused)
        self._refused.clear()
        if done:
            timeout_s = 0.0
        outq = hf_batching.output_queue(self.manager)
        try:
            out = outq.get(timeout=timeout_s) if timeout_s > 0 else outq.get_nowait()
            while True:
                self._handle(out, done)
                out = outq.get_nowait()
        except queue.Empty:
            pass
        if self._streamer is not None:
            self._streamer.decode()
        sink = self._sink
        if sink is not None and sink.any_stop():
            for row in [r.row for r in self._rows.values() if sink.should_stop(r.row)]:
                if (partial := self.cancel(row)) is not None:
                    done.append((row, partial))
        if self._rows and not self.manager.is_running():
            done += self._restart("the continuous-batching loop stopped")
        return done

    def cancel(self, row: int) -> GenResult | None:
        """End a row now with what it has (the manager drops it within a step)."""
        r = self._by_row.get(row)
        if r is None:
            return None
        self.manager.cancel_request(r.rid)
        return self._end(r, stop_seen=False)

    def close(self) -> None:
        for r in list(self._rows.values()):
            self.manager.cancel_request(r.rid)
            self._release(r)
        self._sink = self._streamer = None
        self._last_output = None

    def progress(self) -> float | None:
        return self._last_output if self._rows else None

    def generated_tokens(self) -> int:
        """The static path's count (SwiftEngine) and the loop's: one token per row and step."""
        return super().generated_tokens() + self.sampler.rows_total

    # --- internals ------------------------------------------------------------------

    def _handle(self, out: Any, done: list[tuple[int, GenResult | Exception]]) -> None:
        r = self._rows.get(out.request_id)
        if r is None:
            return  # cancelled, or ended on a stop sequence: already answered
        self._last_output = time.monotonic()
        new = list(out.generated_tokens[len(r.tokens) :])
        stop_seen = False
        if r.params.stop:
            for k, tok in enumerate(new):
                r.tokens.append(tok)
                if self._holds_stop(r):
                    new, stop_seen = new[: k + 1], True
                    break
        else:
            r.tokens += new
        if self._streamer is not None and r.stream and new:
            first = not self._streamer.ids[r.row]
            self._streamer.feed(r.row, new)
            if first:
                self._streamer.decode(force=True)  # time to first token
        if out.error is not None:
            self._release(r)
            done.append((r.row, RuntimeError(out.error)))
        elif stop_seen:
            self.manager.cancel_request(r.rid)
            done.append((r.row, self._end(r, stop_seen=True)))
        elif out.is_finished():
            done.append((r.row, self._end(r, stop_seen=False)))

    def _holds_stop(self, r: _Row) -> bool:
        text = self._decode_tails([r.tokens[-stop_window(r.params.stop) :]])[0]
        return any(s in text for s in r.params.stop)

    def _end(self, r: _Row, stop_seen: bool) -> GenResult:
        text = self.engine.template.decode_generate_ids(r.tokens, template_inputs=r.template_inputs)
        text, cut = truncate_at_stop(str(text), r.params.stop)
        n = len(r.tokens)
        finish: FinishReason = "length" if n >= r.params.max_tokens and not (cut or stop_seen) else "stop"
        if self._streamer is not None and r.stream:
            self._streamer.decode(force=True)
            self._streamer.finish_row(r.row, text)
        trail = self.sampler.trail(r.slot)
        logprobs = trail.entries(self.grammars, n) if trail is not None else None
        self._release(r)
        return GenResult(text, finish, r.prompt_tokens, n, logprobs)

    def _release(self, r: _Row) -> None:
        self._rows.pop(r.rid, None)
        self._by_row.pop(r.row, None)
        self.sampler.release(r.slot)
        self._slots.append(r.slot)  # reused last: a cancelled row may still be in a step

    def _restart(self, why: str) -> list[tuple[int, GenResult | Exception]]:
        error = hf_batching.fatal_error(self.manager)
        logger.error("%s (%s); failing its %d rows and starting it again", why, error, len(self._rows))
        failed: list[tuple[int, GenResult | Exception]] = []
        for r in list(self._rows.values()):
            self._release(r)
            failed.append((r.row, RuntimeError(f"{why}: {error}")))
        self.engine.model.destroy_cached_continuous_batching_manager()
        self._start_manager()
        return failed

    # --- the Engine interface ---------------------------------------------------------

    def generate(
        self, requests: Sequence[GenRequest], sink: TokenSink | None = None
    ) -> list[GenResult | Exception]:
        """All requests through the loop, up to MAX_BATCH_SIZE rows at a time."""
        results: dict[int, GenResult | Exception] = {}
        pending = list(range(len(requests)))
        self.open(sink)
        try:
            while len(results) < len(requests):
                while pending and self.active_rows() < self.max_batch_size:
                    i = pending.pop(0)
                    self.add(i, requests[i])
                for row, res in self.poll(0.05):
                    results[row] = res
            if sink is not None:
                sink.flush()
        finally:
            self.close()
        self.take_step_counts()
        return [results[i] for i in range(len(requests))]
