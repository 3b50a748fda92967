"""The system's metrics as the job store keeps them: one Redis hash (`keys.METRICS`).

Why in Redis and not in each process's prometheus-client registry: a worker has no HTTP
port to scrape and may run on another host, and most of what matters (a job's queue wait,
its run time, how it ended) is known exactly once, in the transition script that moves it.
That script updates the hash in the same atomic step, so a counter can never disagree
with the job records; the API turns the hash into Prometheus families (api.status_view).

Field names: `depth|<lane>`, `finished|<lane>|<status>`, `model_jobs|<model>`, `prompt_tokens|<lane>`,
`generated_tokens|<lane>`, `h|<histogram>|<lane>|<bucket index>` and `s|<histogram>|<lane>`
(sum); the batch-rows histogram has the lane "", the hook histogram `<stage>|<hook>` in its
place; `hook_outcome|<stage>|<hook>|<refused or failed>` counts hooks that did not pass.
`webhook_attempts|<outcome>` and `webhook_deliveries|<status>` count webhook sends (api.webhooks).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from core import keys

#: upper bounds, seconds; one more bucket is +Inf
SECONDS_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
ROWS_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
#: a hook should take microseconds to milliseconds; one that calls a service, up to seconds
HOOK_BUCKETS = (0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
HISTOGRAMS: dict[str, tuple[float, ...]] = {
    "queue_wait": SECONDS_BUCKETS,
    "run": SECONDS_BUCKETS,
    "ttft": SECONDS_BUCKETS,
    "batch_rows": ROWS_BUCKETS,
    "hook": HOOK_BUCKETS,
}


def lua_buckets() -> str:
    """The histograms' bounds as a Lua table, for core/lua/observe.lua."""
    rows = [
        f"{name} = {{{', '.join(repr(float(b)) for b in bounds)}}}" for name, bounds in HISTOGRAMS.items()
    ]
    return "local BUCKETS = {" + ", ".join(rows) + "}"


def bucket_index(name: str, value: float) -> int:
    bounds = HISTOGRAMS[name]
    return next((i for i, b in enumerate(bounds) if value <= b), len(bounds))


def observe_rows(pipe: Any, rows: int, calls: int, ttl: int) -> None:
    """`calls` engine calls of `rows` rows in all (continuous mode: steps), on a pipeline."""
    if calls <= 0:
        return
    mean = rows / calls
    pipe.hincrby(keys.METRICS, f"h|batch_rows||{bucket_index('batch_rows', mean)}", calls)
    pipe.hincrbyfloat(keys.METRICS, "s|batch_rows|", rows)
    pipe.expire(keys.METRICS, ttl)


def observe_hook(pipe: Any, stage: str, hook: str, seconds: float, outcome: str, ttl: int) -> None:
    """One hook's run (models.hooks.Timing), on a pipeline: its time by stage and hook, and
    an outcome other than "ok" counted. Written by whoever ran it (the API for `before`, the
    worker for `after`), since no transition sees a hook."""
    label = f"{stage}|{hook.replace('|', '/')}"
    pipe.hincrby(keys.METRICS, f"h|hook|{label}|{bucket_index('hook', seconds)}", 1)
    pipe.hincrbyfloat(keys.METRICS, f"s|hook|{label}", seconds)
    if outcome != "ok":
        pipe.hincrby(keys.METRICS, f"hook_outcome|{label}|{outcome}", 1)
    pipe.expire(keys.METRICS, ttl)


def count_queued(pipe: Any, lane: str, ttl: int, jobs: int = 1) -> None:
    pipe.hincrby(keys.METRICS, f"depth|{lane}", jobs)
    pipe.expire(keys.METRICS, ttl)


@dataclass
class Histogram:
    bounds: tuple[float, ...]
    counts: list[int]
    total: float = 0.0

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[str, int]]:
        out, run = [], 0
        for bound, n in zip((*self.bounds, float("inf")), self.counts, strict=True):
            run += n
            out.append(("+Inf" if bound == float("inf") else repr(float(bound)), run))
        return out

    def quantile(self, q: float) -> float | None:
        """An estimate of the q-quantile, as Prometheus' `histogram_quantile` computes it:
        the bucket that holds the q-th sample, and linear interpolation within it (the first
        bucket starts at 0). A bucket edge alone would show "5.0 s" for anything between 2.5
        and 5 s. A quantile in the +Inf bucket is the highest finite bound (all that is known
        is that it is past it). None without samples."""
        n = self.count
        if not n:
            return None
        rank = q * n
        below, lower = 0, 0.0
        for bound, c in zip(self.bounds, self.counts, strict=False):  # the +Inf count left out
            if c and below + c >= rank:
                return lower + (float(bound) - lower) * (rank - below) / c
            below, lower = below + c, float(bound)
        return float(self.bounds[-1])


@dataclass
class Snapshot:
    """The hash decoded: what /metrics, `inferq status` and `inferq top` show."""

    depth: dict[str, int] = field(default_factory=dict)
    finished: dict[tuple[str, str], int] = field(default_factory=dict)
    prompt_tokens: dict[str, int] = field(default_factory=dict)
    generated_tokens: dict[str, int] = field(default_factory=dict)
    #: finished jobs by `model` (the base model and each LoRA adapter)
    model_jobs: dict[str, int] = field(default_factory=dict)
    histograms: dict[tuple[str, str], Histogram] = field(default_factory=dict)
    #: (stage, hook, outcome) -> hooks that refused or failed
    hook_outcomes: dict[tuple[str, str, str], int] = field(default_factory=dict)
    #: webhook delivery attempts by outcome (succeeded, failed, refused; api.webhooks)
    webhook_attempts: dict[str, int] = field(default_factory=dict)
    #: webhook deliveries that ended, by status (delivered, failed)
    webhook_deliveries: dict[str, int] = field(default_factory=dict)


#: fields `<name>|<label>` counted into the Snapshot's dict of the same name
_PLAIN_COUNTERS = (
    "prompt_tokens",
    "generated_tokens",
    "model_jobs",
    "webhook_attempts",
    "webhook_deliveries",
)


def _decode_histogram_field(
    kind: str,
    rest: str,
    value: str,
    counts: dict[tuple[str, str], list[int]],
    sums: dict[tuple[str, str], float],
) -> None:
    """One `h|name|lane|bucket` count into `counts` or `s|name|lane` sum into `sums`; a name
    no histogram has, or a bucket past its bounds, is skipped."""
    name, _, tail = rest.partition("|")
    if name not in HISTOGRAMS:
        return
    if kind == "s":
        sums[(name, tail)] = float(value)
        return
    lane, _, idx = tail.rpartition("|")
    slot = counts.setdefault((name, lane), [0] * (len(HISTOGRAMS[name]) + 1))
    if idx.isdigit() and int(idx) < len(slot):
        slot[int(idx)] = int(value)


def decode(raw: dict[str, str], lanes: list[str]) -> Snapshot:
    """Every lane appears, with zeros where nothing happened yet (so rate() has a series)."""
    snap = Snapshot()
    counts: dict[tuple[str, str], list[int]] = defaultdict(list)
    sums: dict[tuple[str, str], float] = {}
    for lane in lanes:
        snap.depth[lane] = 0
        snap.prompt_tokens[lane] = snap.generated_tokens[lane] = 0
        for name in ("queue_wait", "run", "ttft"):
            counts[(name, lane)] = [0] * (len(HISTOGRAMS[name]) + 1)
    counts[("batch_rows", "")] = [0] * (len(ROWS_BUCKETS) + 1)
    for k, v in raw.items():
        kind, _, rest = k.partition("|")
        if kind == "depth":
            snap.depth[rest] = max(int(v), 0)
        elif kind == "finished":
            lane, _, status = rest.rpartition("|")
            snap.finished[(lane, status)] = int(v)
        elif kind in _PLAIN_COUNTERS:
            getattr(snap, kind)[rest] = int(v)
        elif kind in ("h", "s"):
            _decode_histogram_field(kind, rest, v, counts, sums)
        elif kind == "hook_outcome":
            stage, _, tail = rest.partition("|")
            hook, _, outcome = tail.rpartition("|")
            snap.hook_outcomes[(stage, hook, outcome)] = int(v)
    for (name, lane), c in counts.items():
        snap.histograms[(name, lane)] = Histogram(HISTOGRAMS[name], c, sums.get((name, lane), 0.0))
    return snap
