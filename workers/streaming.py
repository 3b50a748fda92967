"""Token deltas from the engine to a job's Redis Stream, and cancel flags back.

Why coalesce: a fast engine produces a token per row every few ms; one XADD per token
per job would make Redis round trips the bottleneck. Why flush on time since the last
flush (not since the first buffered token): a slow engine's token then goes out at once
instead of waiting for the next one.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import redis

from core import keys, scripts
from core.job_store import EVENTS_MAXLEN


class StopFilter:
    """Holds back text that may be the start of a stop sequence, and cuts at one.

    OpenAI leaves the stop sequence out of the output; the engine emits it. Filtering the
    deltas (not only the final text) keeps "concatenated deltas == final content" true.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.buf = ""
        self.text = ""
        self.stopped = False

    def feed(self, delta: str) -> str:
        if self.stopped:
            return ""
        if not self.stops:  # the common case, once per row and step
            self.text += delta
            return delta
        self.buf += delta
        hits = [i for s in self.stops if (i := self.buf.find(s)) >= 0]
        if hits:
            out, self.buf, self.stopped = self.buf[: min(hits)], "", True
        else:
            hold = max(
                (k for s in self.stops for k in range(1, len(s)) if self.buf.endswith(s[:k])), default=0
            )
            cut = len(self.buf) - hold
            out, self.buf = self.buf[:cut], self.buf[cut:]
        self.text += out
        return out

    def finish(self) -> str:
        out = "" if self.stopped else self.buf
        self.buf = ""
        self.text += out
        return out


#: what `StreamSink._next_queued` finds when nothing is queued (None ends the writer)
_NOTHING = object()


@dataclass
class Target:
    """Where request i of a `generate` call reports: a job and its choice index."""

    job_id: str
    index: int
    attempt: int = 1
    #: False for jobs nobody watches (batch lines): their tokens are not written
    publish: bool = True


@dataclass
class StreamSink:
    """Receives deltas from the engine (one thread) and writes them to job streams.

    Token events are written by a background thread, in order: on a GPU a flush comes every
    generation step, and the generating thread would otherwise wait for each Redis round
    trip while the GPU idles. A write that fails is raised in the generating thread at its
    next flush (or at `wait_written`), as a direct write would have been; `wait_written` before anything
    that must follow the tokens (a reset, the jobs' final events)."""

    client: redis.Redis
    targets: list[Target]
    flush_interval_s: float = 0.02
    flush_chars: int = 512
    cancel_poll_s: float = 0.1
    _pending: dict[int, list[str]] = field(default_factory=dict)
    _pending_chars: int = 0
    _last_flush: float = 0.0
    _cancelled: set[str] = field(default_factory=set)
    _last_poll: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock)
    #: job id -> time.time() after which its rows stop (its time limit)
    deadlines: dict[str, float] = field(default_factory=dict)
    #: False: write in the calling thread (no background writer)
    background: bool = True
    #: job id -> time.time() of its first generated text (time to first token)
    first_token_at: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        #: per row, the keys xadd_tokens takes: the job's event stream and its record
        self._streams = [(keys.job_events(t.job_id), keys.job(t.job_id)) for t in self.targets]
        self._xadd_tokens = self.client.register_script(scripts.source("xadd_tokens"))
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._writer: threading.Thread | None = None
        self._error: Exception | None = None
        self._retired: set[str] = set()

    def extend(self, targets: list[Target], deadline: float | None = None) -> range:
        """More rows, for jobs that join a running call (continuous batching)."""
        start = len(self.targets)
        self.targets.extend(targets)
        self._streams += [(keys.job_events(t.job_id), keys.job(t.job_id)) for t in targets]
        if deadline is not None:
            self.deadlines.update({t.job_id: deadline for t in targets})
        return range(start, len(self.targets))

    def retire(self, job_id: str) -> None:
        """The job ended: its cancel flag and time limit are no longer watched."""
        self._retired.add(job_id)
        self.deadlines.pop(job_id, None)

    def on_delta(self, i: int, text: str) -> None:
        if not text:
            return
        if (job_id := self.targets[i].job_id) not in self.first_token_at:
            self.first_token_at[job_id] = time.time()
        if not self.targets[i].publish:
            return
        self._pending.setdefault(i, []).append(text)
        self._pending_chars += len(text)
        now = time.monotonic()
        if now - self._last_flush >= self.flush_interval_s or self._pending_chars >= self.flush_chars:
            self.flush()

    def on_reset(self, i: int) -> None:
        """The request is being run again (its call failed): clients drop its partial text."""
        self._pending.pop(i, None)
        self.wait_written()  # the reset must follow the tokens it voids
        if not self.targets[i].publish:
            return
        t = self.targets[i]
        self._xadd_many([(t.job_id, {"type": "reset", "index": str(t.index), "attempt": str(t.attempt)})])

    def flush(self) -> None:
        self._last_flush = time.monotonic()
        if not self._pending:
            return
        streams: list[str] = []
        args: list[str | int] = [EVENTS_MAXLEN]
        for i, parts in self._pending.items():
            t = self.targets[i]
            streams += self._streams[i]
            args += [t.index, "".join(parts), t.attempt]
        self._pending.clear()
        self._pending_chars = 0
        self._raise_failed_write()
        if not self.background:
            self._xadd_tokens(keys=streams, args=args)
            return
        if self._writer is None:
            self._writer = threading.Thread(target=self._write_loop, name="inferq-token-writer", daemon=True)
            self._writer.start()
        self._queue.put((streams, args))

    def wait_written(self) -> None:
        """Return once every token event handed over so far is written (or raise its error)."""
        if self._writer is not None:
            written = threading.Event()
            self._queue.put(written)
            written.wait()
        self._raise_failed_write()

    def stop(self) -> None:
        """End the writer thread (after what it holds); call once the call is over."""
        if self._writer is not None:
            self._queue.put(None)
            self._writer.join(timeout=30)
            self._writer = None

    def _write_loop(self) -> None:
        """Writes in order; the flushes that queued while a write was out go as one script
        call. Why: an engine whose rows end one by one (continuous batching, the echo
        engine) flushes at each end, and each write was a round trip (1.2 a job, `inferq
        bench fleet`); a GPU's 20 ms flushes seldom queue, and go one by one as before."""
        item = self._queue.get()
        while item is not None:
            if isinstance(item, threading.Event):
                item.set()
                item = self._queue.get()
                continue
            streams, args = list(item[0]), list(item[1])
            item = self._next_queued()
            while isinstance(item, tuple):
                streams += item[0]
                args += item[1][1:]  # less its maxlen: the first one's holds for all
                item = self._next_queued()
            self._write(streams, args)
            if item is _NOTHING:
                item = self._queue.get()

    def _next_queued(self) -> Any:
        try:
            return self._queue.get_nowait()
        except queue.Empty:
            return _NOTHING

    def _write(self, streams: list[str], args: list[str | int]) -> None:
        if self._error is None:  # after a failure, drop writes until it is raised
            try:
                self._xadd_tokens(keys=streams, args=args)
            except Exception as exc:  # raised in the generating thread, see the class doc
                self._error = exc

    def _raise_failed_write(self) -> None:
        if self._error is not None:
            err, self._error = self._error, None
            raise err

    def _xadd_many(self, entries: list[tuple[str, dict[str, str]]]) -> None:
        pipe = self.client.pipeline(transaction=False)
        for job_id, fields in entries:
            pipe.xadd(
                keys.job_events(job_id),
                fields,  # type: ignore[arg-type]
                maxlen=EVENTS_MAXLEN,
                approximate=True,
                nomkstream=True,
            )
        pipe.execute()

    def _poll(self) -> None:
        """Cancel flags from Redis, at most every `cancel_poll_s`."""
        now = time.monotonic()
        if now - self._last_poll >= self.cancel_poll_s and self._lock.acquire(blocking=False):
            try:
                self._last_poll = now
                ids = sorted({t.job_id for t in self.targets} - self._retired)
                flags = self.client.mget([keys.cancel(j) for j in ids]) if ids else []
                self._cancelled = {j for j, f in zip(ids, flags, strict=True) if f}
            except redis.RedisError:
                pass  # keep generating; a cancel is retried on the next poll
            finally:
                self._lock.release()

    def any_stop(self) -> bool:
        """Called from the generation thread on every step."""
        self._poll()
        return bool(self._cancelled) or time.time() > min(self.deadlines.values(), default=float("inf"))

    def should_stop(self, i: int) -> bool:
        self._poll()
        job_id = self.targets[i].job_id
        return job_id in self._cancelled or self.timed_out(job_id)

    def wants_tokens(self, i: int) -> bool:
        return self.targets[i].publish

    def timed_out(self, job_id: str) -> bool:
        return time.time() > self.deadlines.get(job_id, float("inf"))

    def cancelled(self, job_id: str) -> bool:
        return job_id in self._cancelled
