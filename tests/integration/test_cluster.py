"""Hosts and partitions, for real: a small cluster of network namespaces on this machine
(tests/support/netns.py). Valkey in one namespace, the API in another, and each worker in
its own: worker "a" serves the tiny demo model ("tiny"), worker "b" a second tiny random
model ("tiny-b"), and a spare serves "tiny" too, so either "tiny" worker can take over the
other's jobs. Every process talks to Valkey over its veth address only; this test process
reaches Valkey and the API over the switch, from the root namespace.

- jobs for both models all succeed, each run by a worker of its own model;
- a worker's link cut mid-batch: once its heartbeat lapses, the other "tiny" worker runs
  its jobs, and every job ends exactly once;
- the link restored while the cut-off worker still generates a job the other now runs: its
  late result is refused (the attempt it claimed is not the job's any more), so the job does
  not change after it ended and its stream carries one answer.

The real ms-swift engine on the tiny models, the liveness window of tests/support/stack.py
(3 s). Workers are started as the tests need them (the spare with the partition tests), so
`-k` runs only what a test uses.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
import redis

from cli.processes import api_argv, port_open, valkey_argv, worker_argv
from core import keys
from core.config import Settings
from models.demo import build_demo_model
from tests.support import ROOT
from tests.support.netns import Cluster, Host, cluster, require_namespaces
from tests.support.stack import FINISHED, proc_file, stack_env
from tests.support.wait import eventually

# setting up the cluster (a model load per worker on a small CPU) counts toward the first test
pytestmark = pytest.mark.timeout(900)

TINY, TINY_B = "tiny", "tiny-b"
#: inside their namespaces every server has the whole port range to itself
VALKEY_PORT, API_PORT = 6379, 8000
#: a long job: tokens that take the tiny model several seconds on one CPU thread, so that a
#: link cut and restored lands in the middle of its generation
LONG_TOKENS = 1500
#: the jobs of the partition test: a batch for the cut-off worker to be in the middle of
BATCH = 3


def _tiny_b(path: Path) -> Path:
    """A second tiny random model: the demo's shape and template, other weights (another seed),
    and as the demo_model fixture makes it: it never ends a generation by itself."""
    path = build_demo_model(path, seed=1)
    from transformers import AutoTokenizer, GenerationConfig

    tok = AutoTokenizer.from_pretrained(path)
    GenerationConfig(
        suppress_tokens=[tok.eos_token_id, tok.pad_token_id], eos_token_id=tok.eos_token_id
    ).save_pretrained(path)
    return path


def _valkey(address: str, port: int, data: Path) -> list[str]:
    """The embedded Valkey's command line, listening on the host's veth address for the other
    hosts (no loopback-only protected mode: they are not this host)."""
    argv = valkey_argv(port, data)
    argv[argv.index("--bind") + 1] = address
    argv[argv.index("--protected-mode") + 1] = "no"
    return argv


def _ppid(pid: int) -> int:
    for line in proc_file(pid, "status").decode().splitlines():
        if line.startswith("PPid:"):
            return int(line.split()[1])
    return 0


@dataclass
class Worker:
    """A Celery worker in a namespace of its own, serving one model."""

    name: str
    model: str
    host: Host
    proc: subprocess.Popen[bytes]
    log: Path
    #: its pool child's id in Redis (heartbeat, processing list): host:pid
    worker_id: str = ""


@dataclass
class Net:
    """The running cluster and the test's two ways into it: Redis and the API."""

    c: Cluster
    r: redis.Redis
    http: httpx.Client
    #: Valkey as every host reaches it
    redis_url: str
    base: Path
    models: dict[str, Path]
    workers: dict[str, Worker] = field(default_factory=dict)

    def start_workers(self, *specs: tuple[str, str]) -> list[Worker]:
        """Workers (name, model), those not running started side by side (a model load takes
        a while on a small CPU), once each of them beats."""
        for name, model in specs:
            if name not in self.workers:
                self.workers[name] = self._launch(name, model)
        started = [self.workers[name] for name, _ in specs]
        for w in started:
            if not w.worker_id:
                child, logs = partial(self._child_id, w), partial(self.logs, w)
                w.worker_id = eventually(child, timeout=300, interval=0.25, message=logs)
        return started

    def _launch(self, name: str, model: str) -> Worker:
        host = self.c.add_host(name)
        env = stack_env(
            self.redis_url,
            self.models[model],
            self.base / name,
            INFERQ_SERVED_MODEL_NAME=model,
            INFERQ_TORCH_THREADS="1",  # two cores, up to three workers generating at once
            INFERQ_REAP_INTERVAL_S="0.5",
        )
        queues = Settings(model_path=str(self.models[model]), served_model_name=model).queues
        log = self.base / f"{name}.log"
        proc = self.c.start(host, name, worker_argv(queues, name=f"{name}@%h"), env=env, cwd=ROOT, log=log)
        return Worker(name, model, host, proc, log)

    def _child_id(self, w: Worker) -> str | None:
        """The id of `w`'s pool child once it beats (its heartbeat names its pid, whose parent
        is the Celery process started in the namespace)."""
        assert w.proc.poll() is None, f"worker {w.name} exited with {w.proc.returncode}"
        for worker_id in cast(list[str], self.r.zrange(keys.WORKERS, 0, -1)):
            beat = self.beat(worker_id)
            if beat is not None and _ppid(int(beat["pid"])) == w.proc.pid:
                assert beat["model"] == w.model, beat
                return worker_id
        return None

    def beat(self, worker_id: str) -> dict[str, Any] | None:
        raw = self.r.get(keys.worker(worker_id))
        return json.loads(cast(str, raw)) if raw else None

    def submit(self, model: str, content: str, **kw: object) -> str:
        """POST /v1/jobs; the job's id. The API reads the fleet from the heartbeats about once
        a second: a worker that just started may not be known yet (404, 503: asked again)."""
        body = {"model": model, "messages": [{"role": "user", "content": content}], **kw}

        def accepted() -> str | None:
            resp = self.http.post("/v1/jobs", json=body)
            assert resp.status_code in (202, 404, 503), resp.text
            return str(resp.json()["id"]) if resp.status_code == 202 else None

        return eventually(accepted, timeout=10, interval=0.2, message=f"a job for {model} accepted")

    def job(self, job_id: str) -> dict[str, str]:
        """The job's record, as the transition script left it."""
        return cast(dict[str, str], self.r.hgetall(keys.job(job_id)))

    def events(self, job_id: str) -> list[dict[str, str]]:
        return [f for _, f in cast(list[tuple[str, dict[str, str]]], self.r.xrange(keys.job_events(job_id)))]

    def wait_finished(self, jobs: list[str], timeout: float) -> dict[str, dict[str, str]]:
        """Every job's record once all have ended."""

        def ended() -> dict[str, dict[str, str]] | None:
            records = {j: self.job(j) for j in jobs}
            return records if all(rec.get("status") in FINISHED for rec in records.values()) else None

        return eventually(
            ended, timeout=timeout, interval=0.2, message=lambda: f"jobs ended: {self._statuses(jobs)}"
        )

    def _statuses(self, jobs: list[str]) -> dict[str, tuple[str, str, str]]:
        out = {}
        for j in jobs:
            rec = self.job(j)
            out[j] = (rec.get("status", "?"), rec.get("worker", ""), rec.get("attempts", "0"))
        return out

    def tokens(self, w: Worker) -> int:
        """The tokens `w`'s engine generated, as its latest heartbeat says (-1: no heartbeat)."""
        beat = self.beat(w.worker_id)
        return int(beat["tokens_generated"]) if beat else -1

    def wait_idle_since(self, w: Worker, since: float, timeout: float = 120) -> None:
        """Until a heartbeat of `w` beaten after `since` (time.time()) says it ran no task
        since the beat before: whatever it was doing when its link came back is over."""

        def idle() -> bool:
            beat = self.beat(w.worker_id)
            return beat is not None and beat["at"] > since and beat["busy_ratio"] == 0

        eventually(idle, timeout=timeout, interval=0.1, message=lambda: f"{w.name} idle; {self.logs(w)}")

    def logs(self, *workers: Worker) -> str:
        return "\n".join(f"--- {w.name} ---\n{w.log.read_text(errors='replace')[-3000:]}" for w in workers)


def _terminal(events: list[dict[str, str]]) -> list[str]:
    return [e["type"] for e in events if e.get("type") in ("done", "error", "cancelled")]


@pytest.fixture(scope="module")
def net(demo_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Net]:
    """Valkey and the API, each in its namespace; workers come with the tests that use them."""
    require_namespaces()
    base = tmp_path_factory.mktemp("cluster")
    models = {TINY: demo_model, TINY_B: _tiny_b(base / "tiny-b-model")}
    with cluster(["valkey", "api"]) as c:
        valkey, api = c.hosts["valkey"], c.hosts["api"]
        proc = c.start(valkey, "valkey", _valkey(valkey.address, VALKEY_PORT, base / "valkey"))

        def listening() -> bool:
            assert proc.poll() is None, f"valkey exited with code {proc.returncode}"
            return port_open(VALKEY_PORT, host=valkey.address)

        eventually(listening, timeout=15, interval=0.1, message="valkey listening on its veth address")
        url = f"redis://{valkey.address}:{VALKEY_PORT}/0"
        env = stack_env(url, demo_model, base / "api")
        c.start(api, "api", api_argv(api.address, API_PORT), env=env, cwd=ROOT, log=base / "api.log")
        r = redis.Redis.from_url(url, decode_responses=True, socket_timeout=10)
        http = httpx.Client(base_url=f"http://{api.address}:{API_PORT}", timeout=30, trust_env=False)
        try:
            eventually(
                lambda: http.get("/health").status_code == 200,
                timeout=120,
                interval=0.25,
                message=lambda: (base / "api.log").read_text()[-3000:],
            )
            yield Net(c, r, http, url, base, models)
        finally:
            http.close()
            r.close()


def test_jobs_run_on_their_own_models_workers(net: Net) -> None:
    net.start_workers(("a", TINY), ("b", TINY_B))
    jobs = {
        net.submit(model, f"route {i}", max_tokens=8): model for i in range(4) for model in (TINY, TINY_B)
    }
    records = net.wait_finished(list(jobs), timeout=120)
    served = {w.worker_id: w.model for w in net.workers.values()}
    for job_id, model in jobs.items():
        rec = records[job_id]
        assert rec["status"] == "succeeded", rec
        beat = net.beat(rec["worker"])  # the worker that ran it, as it announces itself
        assert beat is not None and beat["model"] == model, (job_id, model, beat)
        assert served[rec["worker"]] == model
        assert json.loads(rec["result"])["model"] == model
        assert _terminal(net.events(job_id)) == ["done"]


def test_a_cut_off_workers_jobs_end_once_on_the_other(net: Net) -> None:
    """A batch mid-generation on one "tiny" worker (x) when its cable is pulled: after the
    liveness window the other (y) runs those jobs, each ends exactly once; x, back, changes
    none of them. Either worker may claim the batch (the one whose fetch the broker answers
    first), so x is whichever is generating it."""
    pair = net.start_workers(("a", TINY), ("spare", TINY))
    before = {w.name: net.tokens(w) for w in pair}  # before the jobs: they start at once
    jobs = [net.submit(TINY, f"long {i}", max_tokens=LONG_TOKENS) for i in range(BATCH)]

    def mid_batch() -> tuple[Worker, list[str]] | None:
        """A worker generating jobs now, and those jobs (none ended: the cut must land
        mid-generation)."""
        recs = {j: net.job(j) for j in jobs}
        assert all(r.get("status") not in FINISHED for r in recs.values()), net._statuses(jobs)
        for w in pair:
            on_w = [
                j for j, r in recs.items() if r.get("status") == "running" and r.get("worker") == w.worker_id
            ]
            if on_w and net.tokens(w) > before[w.name] + 50:
                return w, on_w
        return None

    x, on_x = eventually(mid_batch, timeout=60, interval=0.05, message=lambda: f"{net._statuses(jobs)}")
    y = pair[1] if x is pair[0] else pair[0]
    net.c.cut(x.host)
    try:
        records = net.wait_finished(jobs, timeout=240)
    finally:
        net.c.restore(x.host)
        restored = time.time()
    for job_id, rec in records.items():
        assert rec["status"] == "succeeded", rec
        assert _terminal(net.events(job_id)) == ["done"], job_id
    for job_id in on_x:  # taken over: y's second attempt
        assert records[job_id]["worker"] == y.worker_id, net._statuses(jobs)
        assert records[job_id]["attempts"] == "2"
    net.wait_idle_since(x, restored)
    assert {j: net.job(j) for j in jobs} == records, "a job changed after it ended"
    assert all(_terminal(net.events(j)) == ["done"] for j in jobs)


def _running_on(net: Net, job_id: str, workers: list[Worker]) -> Worker | None:
    rec = net.job(job_id)
    assert rec.get("status") not in FINISHED, rec
    return next(
        (w for w in workers if rec.get("status") == "running" and rec.get("worker") == w.worker_id), None
    )


def test_a_restored_workers_late_result_is_refused(net: Net) -> None:
    """The link of the worker running a job (x) is cut when it is well into it; the other
    "tiny" worker (y) runs the job again; x's link comes back while y runs it and x still
    generates. x would finish first: its result must be refused, y's stands."""
    pair = net.start_workers(("a", TINY), ("spare", TINY))
    job_id = net.submit(TINY, "fenced", max_tokens=LONG_TOKENS)
    x = eventually(lambda: _running_on(net, job_id, pair), timeout=60, interval=0.05, message="job running")
    y = pair[1] if x is pair[0] else pair[0]
    start = net.tokens(x)
    eventually(
        lambda: net.tokens(x) >= start + LONG_TOKENS // 3, timeout=120, interval=0.1, message="x into it"
    )
    net.c.cut(x.host)
    try:
        eventually(
            lambda: _running_on(net, job_id, [y]),
            timeout=60,
            interval=0.05,
            message=lambda: f"{y.name} running the job: {net.job(job_id)}",
        )
    finally:
        net.c.restore(x.host)
        restored = time.time()
    _x_generates_while_y_runs(net, job_id, x, y, restored)
    rec = net.wait_finished([job_id], timeout=240)[job_id]
    net.wait_idle_since(x, restored)
    after = net.job(job_id)
    events = net.events(job_id)
    assert after == rec, f"the job changed after it ended: {rec} -> {after}"
    assert rec["status"] == "succeeded" and rec["worker"] == y.worker_id and rec["attempts"] == "2", rec
    assert _terminal(events) == ["done"], events
    _answer_is_the_second_attempts(rec, events)
    _no_stale_tokens(events)


def _streamed(events: list[dict[str, str]], attempt: str) -> str:
    return "".join(e["text"] for e in events if e.get("type") == "token" and e.get("attempt") == attempt)


def _answer_is_the_second_attempts(rec: dict[str, str], events: list[dict[str, str]]) -> None:
    """The job's result is the text y streamed in its attempt (the second), not x's late one
    (the seeds of unseeded rows are random: two attempts never write the same text)."""
    content = json.loads(rec["result"])["choices"][0]["message"]["content"]
    second, first = _streamed(events, "2"), _streamed(events, "1")
    if content != second:
        whose = (
            "the first attempt's (the cut-off worker's)" if content.startswith(first) else "neither attempt's"
        )
        pytest.fail(f"the job's result ({len(content)} chars) is {whose}, not the second attempt's answer")


def _x_generates_while_y_runs(net: Net, job_id: str, x: Worker, y: Worker, restored: float) -> None:
    """x beats again and its engine makes tokens (its generation goes on) while y still runs
    the job: the late result is yet to come."""
    first: list[int] = []

    def generating() -> bool:
        assert _running_on(net, job_id, [y]), f"the job left {y.name} before {x.name} came back"
        beat = net.beat(x.worker_id)
        if beat is None or beat["at"] <= restored:
            return False
        first.append(int(beat["tokens_generated"]))
        return first[-1] > first[0]

    eventually(generating, timeout=60, interval=0.1, message=lambda: f"{x.name} generating; {net.logs(x)}")


def _no_stale_tokens(events: list[dict[str, str]]) -> None:
    """Once the second attempt's `reset` is in the stream, no token of the first follows it: a
    client reading the stream sees one answer."""
    reset = next(i for i, e in enumerate(events) if e.get("type") == "reset")
    stale = [e for e in events[reset:] if e.get("type") == "token" and e.get("attempt") != "2"]
    assert not stale, f"{len(stale)} tokens of the first attempt after its reset, e.g. {stale[:2]}"
