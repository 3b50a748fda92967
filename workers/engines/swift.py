"""The real engine: ms-swift's TransformersEngine behind our `Engine` seam.

Only the worker child (and the API's prompt counter) import this module, never the
Celery parent: importing torch before fork breaks CUDA in the children.

What we add around ms-swift 4.6, and why:
- one `generate` call takes one config, so requests with different settings would each
  need their own call; instead every call is greedy with the largest row's token limit,
  and each row gets its own limit, stop sequences, sampling settings, penalties and seed
  back through per-row hooks (workers.engines.rows);
- `seed`, `presence_penalty` and `frequency_penalty` are silently ignored by the engine;
  we honour them there too (a generator per seeded row, an OpenAI-style additive penalty);
- OpenAI leaves the stop sequence out of the text; the engine keeps it, so we cut it;
- a failing call is retried in halves, so one bad request fails alone.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, cast

import torch
from swift.infer_engine import InferRequest, RequestConfig, TransformersEngine
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from core.config import Settings
from models.prompts import tool_format
from models.spec import ModelFacts, ModelSpec
from workers.adapters import AdapterDir, AdapterSlots, pack
from workers.engine import (
    AdapterMissing,
    FinishReason,
    GenParams,
    GenRequest,
    GenResult,
    TokenSink,
    run_split,
    truncate_at_stop,
)
from workers.engines.guide import GrammarBook, LogprobTrail
from workers.engines.rows import RowLimits, RowPenalties, RowSampler
from workers.streaming import StopFilter

logger = logging.getLogger(__name__)


def _dtype(name: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def _device_map(name: str) -> str:
    if name == "auto" and not torch.cuda.is_available():
        return "cpu"
    return name


class _NoStops:
    """The all-False answer of a stopping criterion, made once per row count: criteria run
    every generation step."""

    def __init__(self) -> None:
        self._t: torch.BoolTensor | None = None

    def __call__(self, input_ids: torch.LongTensor) -> torch.BoolTensor:
        n = input_ids.shape[0]
        if self._t is None or self._t.shape[0] != n:
            self._t = cast(torch.BoolTensor, torch.zeros(n, dtype=torch.bool, device=input_ids.device))
        return self._t


class RowStopper(StoppingCriteria):
    """Stops the rows whose request was cancelled (or ran out of time), inside HF `generate`:
    breaking out of ms-swift's stream does not stop generation, a stopping criterion does.
    Runs every step, so the common case (nothing to stop) is one call and a cached tensor."""

    def __init__(self, sink: TokenSink) -> None:
        self.sink = sink
        self._none = _NoStops()

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **_: Any) -> torch.BoolTensor:
        if not self.sink.any_stop():
            return self._none(input_ids)
        rows = [self.sink.should_stop(i) for i in range(input_ids.shape[0])]
        return cast(torch.BoolTensor, torch.tensor(rows, dtype=torch.bool, device=input_ids.device))


def fast_decode_batch(tokenizer: Any) -> Callable[..., list[str]] | None:
    """The Rust tokenizer's `decode_batch`, where it decodes exactly as `tokenizer.decode`
    does (a fast tokenizer without space clean-up), else None. Why: streaming and stop checks
    decode on every step, in the thread that drives the GPU, and through transformers each
    call costs more Python than the decoding itself."""
    backend = getattr(tokenizer, "_tokenizer", None)
    exact = not getattr(tokenizer, "clean_up_tokenization_spaces", True)
    return backend.decode_batch if backend is not None and exact else None


def decode_many(tokenizer: Any, fast: Callable[..., list[str]] | None, windows: list[list[int]]) -> list[str]:
    """Each token list as text, special tokens kept: in one call through `fast` if given."""
    if fast is not None:
        return list(fast(windows, skip_special_tokens=False))
    return [
        str(tokenizer.decode(w, skip_special_tokens=False, spaces_between_special_tokens=False)) if w else ""
        for w in windows
    ]


class DeltaStreamer(BaseStreamer):
    """Streams text deltas from inside HF `generate`, token by token as they are sampled.

    Why not ms-swift's own stream (`RequestConfig(stream=True)`): in 4.6 it runs generate in
    a second thread that hangs forever if generate raises, and its whitespace heuristic
    (`_align_blank_suffix`) changes the text, so streamed text and the final result differ.
    Here generate runs in the caller's thread (an exception simply propagates), deltas are
    decoded exactly as the final text is, and `settle` reconciles the tail so that the
    concatenated deltas always equal the final content.

    Why decode every `interval_s` rather than every step: the sink coalesces writes on that
    period anyway, and a fast engine (a few ms per step) spent a tenth of its time in
    per-token decoding. The first token of the call is decoded at once (time to first token).
    """

    def __init__(
        self,
        template: Any,
        sink: TokenSink,
        stops: Sequence[Sequence[str]],
        rows: int,
        interval_s: float = 0.02,
    ) -> None:
        self.template = template
        self.tokenizer = template.tokenizer
        # None: decode row by row through transformers (see `fast_decode_batch`)
        self._decode_batch = fast_decode_batch(self.tokenizer)
        self.skip_ids = {template.tokenizer.pad_token_id, template.tokenizer.eos_token_id}
        self.sink = sink
        self.interval_s = interval_s
        self.ids: list[list[int]] = [[] for _ in range(rows)]
        self.emitted = [""] * rows
        # incremental detokenization (as vLLM does): decode a short window, not the whole text
        self.prefix_offset = [0] * rows
        self.read_offset = [0] * rows
        #: stops[row]: that row's stop sequences (an empty list: none for any row)
        self.filters = [StopFilter(stops[row] if row < len(stops) else ()) for row in range(rows)]
        self._prompt_seen = False
        self._last_decode: float | None = None

    def add_row(self, stops: Sequence[str]) -> None:
        """One more row (continuous batching: a request joined the running loop)."""
        self.ids.append([])
        self.emitted.append("")
        self.prefix_offset.append(0)
        self.read_offset.append(0)
        self.filters.append(StopFilter(stops))

    def feed(self, row: int, tokens: Sequence[int]) -> None:
        """New tokens of one row, outside HF `generate`; decoded at most every `interval_s`
        (call `decode` when the row's tokens must be out now)."""
        self.ids[row] += [t for t in tokens if t not in self.skip_ids]

    def decode(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or self._last_decode is None or now - self._last_decode >= self.interval_s:
            self._last_decode = now
            self._decode_rows()

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # HF first hands over the prompt
            self._prompt_seen = True
            return
        tokens = value.view(-1).tolist()
        for row, tok in enumerate(tokens[: len(self.ids)]):
            if tok not in self.skip_ids:  # padding of finished rows, and the EOS the text drops too
                self.ids[row].append(tok)
        now = time.monotonic()
        if self._last_decode is None or now - self._last_decode >= self.interval_s:
            self._last_decode = now
            self._decode_rows()

    def _decode_rows(self) -> None:
        rows = [row for row, ids in enumerate(self.ids) if len(ids) > self.read_offset[row]]
        if not rows:
            return
        windows: list[list[int]] = []
        for row in rows:  # per row: the window up to what was read before, and up to now
            ids, start = self.ids[row], self.prefix_offset[row]
            windows += [ids[start : self.read_offset[row]], ids[start:]]
        texts = self._decode_many(windows)
        for k, row in enumerate(rows):
            prefix, text = texts[2 * k], texts[2 * k + 1]
            if text.endswith("\ufffd") or len(text) <= len(prefix):
                continue  # an incomplete UTF-8 sequence (or a stop token): wait for more tokens
            self.prefix_offset[row], self.read_offset[row] = self.read_offset[row], len(self.ids[row])
            delta = self.filters[row].feed(text[len(prefix) :])
            self.sink.on_delta(row, delta)
            self.emitted[row] += delta

    def _decode_many(self, windows: list[list[int]]) -> list[str]:
        # The tokenizer directly: the template's decode re-tokenizes its stop words on every
        # call (a third of the streaming cost). `settle` reconciles the rare difference.
        return decode_many(self.tokenizer, self._decode_batch, windows)

    def end(self) -> None:
        self._decode_rows()
        self.sink.flush()

    def finish_row(self, row: int, final: str) -> None:
        """Send what the final text has beyond the deltas; restart the row if they diverged."""
        if final.startswith(self.emitted[row]):
            self.sink.on_delta(row, final[len(self.emitted[row]) :])
        else:
            self.sink.on_reset(row)
            self.sink.on_delta(row, final)
        self.emitted[row] = final


def stop_token_ids(template: Any, generation_config: Any) -> list[int]:
    """Template stop words that are one token (as ms-swift's static path stops at them), and
    the model's EOS: the tokens that end a row, and that a finished grammar allows."""
    tok = template.tokenizer
    ids = {tok.eos_token_id} if tok.eos_token_id is not None else set()
    gen_eos = getattr(generation_config, "eos_token_id", None)
    ids |= set(gen_eos if isinstance(gen_eos, list) else [gen_eos] if gen_eos is not None else [])
    for word in template.template_meta.stop_words:
        if isinstance(word, str):
            enc = tok.encode(word, add_special_tokens=False)
            if len(enc) == 1:
                ids.add(enc[0])
    # the EOS first: a finished grammar forces the first of them
    first = [tok.eos_token_id] if tok.eos_token_id is not None else []
    return first + sorted(ids - set(first))


def _vocab_size(model: Any) -> int:
    """The width of the model's logits (it may exceed the tokenizer's vocabulary)."""
    head = model.get_output_embeddings()
    return int(head.weight.shape[0]) if head is not None else int(model.config.vocab_size)


def _pad_id(tokenizer: Any, generation_config: Any) -> int | None:
    """What HF's generate appends to a row that ended: the generation config's pad token,
    else the tokenizer's, else the first EOS (as generate itself falls back)."""
    for pad in (getattr(generation_config, "pad_token_id", None), tokenizer.pad_token_id):
        if isinstance(pad, int):
            return pad
    eos = getattr(generation_config, "eos_token_id", None)
    first = eos[0] if isinstance(eos, list) and eos else eos
    return first if isinstance(first, int) else None


class ProgressBeat(StoppingCriteria):
    """Never stops anything; records that a generation step happened (for the watchdog) and
    the tokens it made (for the heartbeat's tokens/s): one per row whose newest token is not
    padding (HF pads the rows that already ended)."""

    def __init__(self, engine: SwiftEngine) -> None:
        self.engine = engine
        self._none = _NoStops()

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **_: Any) -> torch.BoolTensor:
        self.engine._progress = time.monotonic()
        pad = self.engine._pad_id
        last = input_ids[:, -1]
        self.engine._tokens += int(last.shape[0] if pad is None else int((last != pad).sum()))
        return self._none(input_ids)


class SwiftEngine:
    def __init__(self, spec: ModelSpec, settings: Settings) -> None:
        self.max_batch_size = settings.max_batch_size
        if threads := settings.torch_threads:
            torch.set_num_threads(threads)
        t0 = time.monotonic()
        self.engine = TransformersEngine(
            str(spec.path),
            model_type=spec.model_type or None,
            template_type=spec.template or None,
            adapters=spec.adapters or None,
            torch_dtype=_dtype(settings.torch_dtype),
            device_map=_device_map(settings.device_map),
            max_batch_size=settings.max_batch_size,
        )
        self.facts = ModelFacts(
            model_id=settings.model_id,
            context_length=int(self.engine.model_info.max_model_len or self.engine.template.max_length),
            demo=spec.demo,
            accelerator=torch.cuda.is_available() and _device_map(settings.device_map) != "cpu",
            tool_format=tool_format(self.engine.template),
            vocab_size=len(self.engine.tokenizer),
        )
        self.stop_token_ids = stop_token_ids(self.engine.template, self.engine.generation_config)
        #: structured outputs and enforced tool calls: one matcher per guided row
        self.grammars = GrammarBook(
            self.engine.tokenizer, _vocab_size(self.engine.model), self.stop_token_ids
        )
        # Per-call extras the wrapped `generate` reads; one call runs at a time per child.
        self._procs: list[LogitsProcessor] = []
        self._stoppers: list[StoppingCriteria] = []
        self._streamer: DeltaStreamer | None = None
        self._fast_decode = fast_decode_batch(self.engine.tokenizer)
        # a row that sets no top_k gets the model's (as ms-swift's own config would)
        self._default_top_k = int(getattr(self.engine.generation_config, "top_k", None) or 0)
        self._progress: float | None = None
        #: tokens made so far (ProgressBeat), and the id HF pads ended rows with
        self._tokens = 0
        self._pad_id: int | None = _pad_id(self.engine.tokenizer, self.engine.generation_config)
        self._lock = threading.Lock()
        #: LoRA adapters served by name (INFERQ_ADAPTERS_DIR), mixed per row in one call
        self.adapters = AdapterSlots(self.engine.model, settings.max_loaded_adapters)
        self._orig_generate: Callable[..., Any] = self.engine.template.generate
        self.engine.template.generate = self._generate
        logger.info(
            "loaded %s in %.1fs (demo=%s, torch threads %d)",
            spec.path,
            time.monotonic() - t0,
            spec.demo,
            torch.get_num_threads(),
        )

    def _generate(self, model: Any, *args: Any, **kwargs: Any) -> Any:
        """Wraps HF generate to add our processors, stopping criteria and token streamer."""
        if self._procs:
            procs = kwargs.get("logits_processor") or LogitsProcessorList()
            procs.extend(self._procs)
            kwargs["logits_processor"] = procs
        crit = kwargs.get("stopping_criteria") or StoppingCriteriaList()
        crit.extend([*self._stoppers, ProgressBeat(self)])
        kwargs["stopping_criteria"] = crit
        if self._streamer is not None:
            kwargs["streamer"] = self._streamer
        return self._orig_generate(model, *args, **kwargs)

    def count_prompt_tokens(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None
    ) -> int:
        return len(self.engine.template.encode(InferRequest(messages=messages, tools=tools))["input_ids"])

    def sync_adapters(self, wanted: dict[str, AdapterDir] | Callable[[], dict[str, AdapterDir]]) -> list[str]:
        """Serve exactly these adapters (or what the callable reads, read once the lock is
        held, so a scan is never older than the call that applies it); between calls, so a
        running one keeps the weights it started with. Returns the names served now."""
        with self._lock:
            self.adapters.sync(wanted() if callable(wanted) else wanted)
            return self.adapters.names

    def adapter_names(self) -> list[str]:
        return self.adapters.names

    def adapter_facts(self) -> dict[str, Any]:
        """For the heartbeat: refusals of the last sync, the adapters not served because they
        were refused (`refused_now`, name -> why), loads and unloads so far."""
        a = self.adapters
        return {"refused": a.last_refused, "refused_now": a.refused, "loads": a.loads, "unloads": a.unloads}

    def progress(self) -> float | None:
        return self._progress

    def generated_tokens(self) -> int:
        return self._tokens

    def generate(
        self, requests: Sequence[GenRequest], sink: TokenSink | None = None
    ) -> list[GenResult | Exception]:
        results: list[GenResult | Exception] = [AdapterMissing()] * len(requests)
        with self._lock:
            self._progress = time.monotonic()
            try:
                runnable = []
                for i, r in enumerate(requests):
                    if r.adapter and r.adapter not in self.adapters.available:
                        results[i] = AdapterMissing(f"The adapter '{r.adapter}' is not served (any more).")
                    else:
                        runnable.append(i)
                names = [r.adapter for r in requests]
                for chunk in pack(names, runnable, self.max_batch_size, self.adapters.cap):
                    problems = self.adapters.ensure({names[i] for i in chunk} - {""})
                    for i in [i for i in chunk if names[i] in problems]:
                        why = problems[names[i]]
                        results[i] = AdapterMissing(f"The adapter '{names[i]}' could not be loaded: {why}")
                    ok = [i for i in chunk if names[i] not in problems]
                    for i, res in zip(ok, self._run_isolated(requests, ok, sink) if ok else [], strict=True):
                        results[i] = res
            finally:
                self._progress = None
        return results

    def _run_isolated(
        self, requests: Sequence[GenRequest], idxs: list[int], sink: TokenSink | None
    ) -> list[GenResult | Exception]:
        return run_split(
            lambda part: self._run(requests, part, sink),
            idxs,
            sink.on_reset if sink is not None else None,
        )

    def _run(
        self, requests: Sequence[GenRequest], idxs: list[int], sink: TokenSink | None
    ) -> list[GenResult | Exception]:
        params = [requests[i].params for i in idxs]
        # greedy for the call as a whole: RowSampler samples the rows that ask for it
        config = RequestConfig(max_tokens=max(p.max_tokens for p in params), temperature=0)
        self._procs = []
        if any(p.presence_penalty or p.frequency_penalty for p in params):
            self._procs.append(RowPenalties(params))
        sampler = RowSampler(params, self._default_top_k, self.grammars, self.stop_token_ids)
        if sampler.active:
            self._procs.append(sampler)
        limits = RowLimits(params, self._decode_tails)
        self._stoppers = [limits]
        if sink is not None:
            self._stoppers.append(RowStopper(_SubSink(sink, idxs)))
        # nobody watches the rows (batch lines): no step-by-step detokenizing
        streamer: DeltaStreamer | None = None
        if sink is not None and any(sink.wants_tokens(i) for i in idxs):
            stops = [p.stop for p in params]
            streamer = DeltaStreamer(self.engine.template, _SubSink(sink, idxs), stops, len(idxs))
        self._streamer = streamer
        infer_requests = [InferRequest(messages=requests[i].messages, tools=requests[i].tools) for i in idxs]
        try:
            with self.adapters.rows([requests[i].adapter for i in idxs]):
                outs = self.engine.infer(infer_requests, config, use_tqdm=False)
        finally:
            self._procs, self._stoppers, self._streamer = [], [], None
        results = [
            self._to_result(out, p, row in limits.stopped, sampler.trail(row))
            for row, (out, p) in enumerate(zip(outs, params, strict=True))
        ]
        if streamer is not None:
            for row, res in enumerate(results):
                if isinstance(res, GenResult):
                    streamer.finish_row(row, res.text)
            streamer.sink.flush()
        return results

    def _decode_tails(self, tails: list[list[int]]) -> list[str]:
        """The last tokens of rows, for the stop checks that run every step."""
        return decode_many(self.engine.tokenizer, self._fast_decode, tails)

    def _to_result(
        self, out: Any, params: GenParams, stop_seen: bool, trail: LogprobTrail | None
    ) -> GenResult | Exception:
        """Finish reason by the row's own settings: the call's limit is the largest row's."""
        if isinstance(out, Exception):
            return out
        choice = out.choices[0]
        text, cut = truncate_at_stop(choice.message.content or "", params.stop)
        tokens = out.usage.completion_tokens
        finish: FinishReason = "length" if tokens >= params.max_tokens and not (cut or stop_seen) else "stop"
        logprobs = trail.entries(self.grammars, tokens) if trail is not None else None
        return GenResult(text, finish, out.usage.prompt_tokens, tokens, logprobs)


class _SubSink:
    """A chunk's view of the call's sink: row r of this `generate` is request idxs[r]."""

    def __init__(self, sink: TokenSink, idxs: list[int]) -> None:
        self.sink, self.idxs = sink, idxs

    def on_delta(self, i: int, text: str) -> None:
        self.sink.on_delta(self.idxs[i], text)

    def on_reset(self, i: int) -> None:
        self.sink.on_reset(self.idxs[i])

    def flush(self) -> None:
        self.sink.flush()

    def should_stop(self, i: int) -> bool:
        return self.sink.should_stop(self.idxs[i])

    def any_stop(self) -> bool:
        return self.sink.any_stop()  # of the whole call: may be true for other chunks' rows

    def wants_tokens(self, i: int) -> bool:
        return self.sink.wants_tokens(self.idxs[i])
