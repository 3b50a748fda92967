"""`inferq bench fleet`: what one broker can carry.

Why: every GPU worker of a deployment talks to the same Valkey, so the broker's CPU per job
decides how many workers one Valkey core serves. The echo engine takes the model's cost out,
so what is left is the queue's own traffic: the API's enqueue, Celery's messages, the
claims, the transitions, the token events and the acknowledgements.

One Valkey and one API; workers added 1 -> 2 -> 4 -> 8 (`--workers`). At each size: Valkey's
idle rate with that many workers (heartbeats, BRPOP timeouts, reapers), then a backlog of
`/v1/jobs` (and the same count of lines as one OpenAI batch), each window closed once the
broker's command rate is back near idle (the parents acknowledge batch-mates' messages up to
a second after their jobs ended; those acks are part of a job's cost). From INFO: the main
thread's CPU and `commandstats` over the window, less the idle rate times its length. Then a
MONITOR pass (its own, smaller backlog: MONITOR slows the server) counts the commands each
process sends per job and the commands each Lua script runs.

On a small machine the API, the workers and the load generator share the cores with Valkey,
so jobs/s is the machine's; Valkey CPU per job is the figure that carries over.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import statistics
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any
from unittest import mock

import httpx
import redis

from bench._stack import ROOT, stack
from bench.common import last_finish, post_all, wait_done
from cli.processes import Supervisor, wait_for, worker_argv
from core import keys, metrics
from core.config import Settings

#: the issue's goal: one Valkey core carries this many workers at GOAL_RATE jobs/s each
GOAL_WORKERS = 100
GOAL_RATE = 20.0
#: job rates per worker the capacity is stated at (50: a GPU worker on short answers)
RATES = (20.0, 50.0)
MARK = "inferq-fleet:"


@dataclass(frozen=True)
class Usage:
    """Valkey's counters at an instant (`seconds` on the monotonic clock), or what it did
    over a window (`seconds` its length): main-thread CPU, whole-process CPU, and per command
    the calls and microseconds of INFO commandstats."""

    seconds: float
    cpu_main_s: float
    cpu_s: float
    calls: dict[str, int]
    usec: dict[str, int]
    #: the main thread's system CPU (in cpu_main_s): the kernel's share, reading and
    #: writing sockets and the AOF, which grows with round trips rather than with work
    sys_main_s: float = 0.0
    #: socket reads the server processed (INFO stats total_reads_processed): one per round
    #: trip however many commands a client pipelined into it
    reads: int = 0

    def since(self, earlier: Usage) -> Usage:
        return Usage(
            self.seconds - earlier.seconds,
            self.cpu_main_s - earlier.cpu_main_s,
            self.cpu_s - earlier.cpu_s,
            _diff(self.calls, earlier.calls),
            _diff(self.usec, earlier.usec),
            self.sys_main_s - earlier.sys_main_s,
            self.reads - earlier.reads,
        )

    def less_idle(self, idle: Usage) -> Usage:
        """This window less what the idle stack does in as long: the jobs' own cost. A
        command that runs less than when idle (BRPOP that returns at once instead of timing
        out) counts 0, not below."""
        k = self.seconds / idle.seconds if idle.seconds > 0 else 0.0
        return Usage(
            self.seconds,
            self.cpu_main_s - idle.cpu_main_s * k,
            self.cpu_s - idle.cpu_s * k,
            {c: max(0, round(v - idle.calls.get(c, 0) * k)) for c, v in self.calls.items()},
            {c: max(0, round(v - idle.usec.get(c, 0) * k)) for c, v in self.usec.items()},
            self.sys_main_s - idle.sys_main_s * k,
            max(0, round(self.reads - idle.reads * k)),
        )


def _diff(a: Mapping[str, int], b: Mapping[str, int]) -> dict[str, int]:
    return {k: v - b.get(k, 0) for k, v in a.items() if v != b.get(k, 0)}


def parse_commandstats(info: Mapping[str, Any]) -> tuple[dict[str, int], dict[str, int]]:
    """INFO commandstats as redis-py parses it ({"cmdstat_get": {"calls": 3, "usec": 9,
    ...}}) -> (calls, usec) by command name ("get", "client|setinfo")."""
    calls: dict[str, int] = {}
    usec: dict[str, int] = {}
    for key, stat in info.items():
        if key.startswith("cmdstat_") and isinstance(stat, Mapping):
            name = key.removeprefix("cmdstat_")
            calls[name] = int(stat.get("calls", 0))
            usec[name] = int(stat.get("usec", 0))
    return calls, usec


def snapshot(r: redis.Redis) -> Usage:
    cpu = r.info("cpu")
    calls, usec = parse_commandstats(r.info("commandstats"))
    reads = int(r.info("stats")["total_reads_processed"])
    return Usage(
        time.monotonic(),
        float(cpu["used_cpu_sys_main_thread"]) + float(cpu["used_cpu_user_main_thread"]),
        float(cpu["used_cpu_sys"]) + float(cpu["used_cpu_user"]),
        calls,
        usec,
        float(cpu["used_cpu_sys_main_thread"]),
        reads,
    )


def per_job(u: Usage, jobs: int, top: int = 12) -> dict[str, Any]:
    """A window's cost per job: Valkey CPU (ms, main thread and whole process), commands and
    the costliest commands by microseconds (EVALSHA and EXEC include the commands they run,
    which commandstats also counts under their own names)."""
    ranked = sorted(u.usec, key=lambda c: u.usec[c], reverse=True)[:top]
    return {
        "valkey_cpu_ms_per_job": round(u.cpu_main_s * 1000 / jobs, 4),
        "valkey_process_cpu_ms_per_job": round(u.cpu_s * 1000 / jobs, 4),
        "valkey_sys_share": round(u.sys_main_s / u.cpu_main_s, 3) if u.cpu_main_s > 0 else 0.0,
        "command_us_per_job": round(sum(u.usec.values()) / jobs, 1),
        "commands_per_job": round(sum(u.calls.values()) / jobs, 2),
        "round_trips_per_job": round(u.reads / jobs, 2),
        "top_commands": [
            {
                "command": c,
                "calls_per_job": round(u.calls.get(c, 0) / jobs, 3),
                "us_per_job": round(u.usec[c] / jobs, 2),
            }
            for c in ranked
            if u.usec[c] > 0
        ],
    }


def capacity(cpu_ms_per_job: float, rate: float, idle_ms_per_worker_s: float = 0.0) -> float:
    """Workers one Valkey core carries when each completes `rate` jobs/s: a worker costs the
    broker its jobs' CPU plus its idle traffic, per second of a core."""
    per_worker = cpu_ms_per_job * rate + idle_ms_per_worker_s
    return 1000.0 / per_worker if per_worker > 0 else float("inf")


def slope(points: Iterable[tuple[float, float]]) -> float:
    """Least-squares slope through the origin-free points (x, y); one x only: y / x. Idle
    Valkey CPU against the number of workers: what one more idle worker costs."""
    pts = list(points)
    xs = [x for x, _ in pts]
    if len(set(xs)) < 2:
        return sum(y for _, y in pts) / max(sum(xs), 1e-9)
    mx, my = statistics.fmean(xs), statistics.fmean(y for _, y in pts)
    return sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x in xs)


def round_trip_cost(r: redis.Redis, n: int = 5000, depth: int = 20) -> dict[str, float]:
    """Valkey's main-thread CPU for a PING in a round trip of its own and for one of `depth`
    pipelined together, on this server now: what a round trip costs here beside what a
    command costs (on a VM the socket path is dear; the ratio says where to cut)."""

    def cpu() -> float:
        c = r.info("cpu")
        return float(c["used_cpu_sys_main_thread"]) + float(c["used_cpu_user_main_thread"])

    c0 = cpu()
    for _ in range(n):
        r.ping()
    c1 = cpu()
    for _ in range(n // depth):
        pipe = r.pipeline(transaction=False)
        for _ in range(depth):
            pipe.ping()
        pipe.execute()
    c2 = cpu()
    return {
        "us_per_round_trip": round((c1 - c0) * 1e6 / n, 1),
        "us_per_pipelined_command": round((c2 - c1) * 1e6 / (n // depth * depth), 1),
    }


# --- MONITOR: who sends what ---------------------------------------------------------------

_LINE = re.compile(r'^\+?(\d+\.\d+) \[\d+ ([^\]]+)\] "([^"]*)"(?: "([^"]*)")?')
_SCRIPT_NAME = re.compile(r"^-- (\w+):", re.MULTILINE)


@dataclass
class Tally:
    """MONITOR lines between two marks: top-level commands by (process, command) and the
    commands Lua scripts ran by (script, command)."""

    top: Counter[tuple[str, str]]
    lua: Counter[tuple[str, str]]


def parse_monitor(
    lines: Iterable[str],
    roles: Mapping[int, str],
    scripts: Mapping[str, str],
    skip: frozenset[str] = frozenset({"bench", "monitor"}),
) -> dict[str, Tally]:
    """Splits the stream at the bench's ECHO marks (`inferq-fleet:<window>`) into windows.
    A Lua command belongs to the script whose EVALSHA came just before it: the server runs
    one command at a time and MONITOR shows a script's commands right after its call. The
    measuring processes' own commands (`skip`) are left out."""
    windows: dict[str, Tally] = {}
    current: Tally | None = None
    script = "?"
    for line in lines:
        m = _LINE.match(line)
        if not m:
            continue
        addr, cmd, arg = m.group(2), m.group(3).upper(), m.group(4) or ""
        if cmd == "ECHO" and arg.startswith(MARK):
            current = windows.setdefault(arg.removeprefix(MARK), Tally(Counter(), Counter()))
            continue
        if current is None:
            continue
        if addr == "lua":
            current.lua[(script, cmd)] += 1
            continue
        label = cmd
        if cmd == "EVALSHA":
            script = scripts.get(arg.lower(), arg[:8])
            label = f"EVALSHA {script}"
        elif cmd == "EVAL":
            script = "eval"
        port = int(addr.rpartition(":")[2]) if addr.rpartition(":")[2].isdigit() else -1
        if (role := roles.get(port, "other")) not in skip:
            current.top[(role, label)] += 1
    return windows


def script_names(r: redis.Redis, shas: Iterable[str]) -> dict[str, str]:
    """sha -> the script's name from its header line (`-- pop: ...`); SCRIPT SHOW is
    Valkey's (8.0+). A script with no such header (a library's) keeps its sha's head."""
    out: dict[str, str] = {}
    for sha in shas:
        try:
            text = r.execute_command("SCRIPT", "SHOW", sha)
        except redis.RedisError:
            continue
        body = text.decode() if isinstance(text, bytes) else str(text)
        m = _SCRIPT_NAME.search(body)
        out[sha] = m.group(1) if m else sha[:8]
    return out


def shas_in(lines: Iterable[str]) -> set[str]:
    found = set()
    for line in lines:
        m = _LINE.match(line)
        if m and m.group(3).upper() == "EVALSHA" and m.group(4):
            found.add(m.group(4).lower())
    return found


def net_per_job(run: Counter[Any], idle: Counter[Any], scale: float, jobs: int) -> dict[Any, float]:
    """Counts of the run window less the idle window's times `scale`, per job."""
    out = {k: (v - idle.get(k, 0) * scale) / jobs for k, v in run.items()}
    return {k: round(v, 3) for k, v in sorted(out.items(), key=lambda kv: -kv[1]) if v > 0.0005}


class Monitor:
    """MONITOR's raw stream kept in memory and parsed afterwards: a reader thread that only
    copies bytes (socket reads release the GIL) takes little from the load generator in the
    same process."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.port = int(self.sock.getsockname()[1])
        self.chunks: list[bytes] = []
        self.scanned = 0
        self.sock.sendall(b"MONITOR\r\n")
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            while data := self.sock.recv(1 << 20):
                self.chunks.append(data)
        except OSError:
            pass

    def seen(self, text: str) -> bool:
        """`text` came through since the last time it was looked for (the chunks after the
        one it was in, each time: idle workers' traffic after the mark can be many chunks)."""
        start = max(self.scanned - 1, 0)  # a chunk back: the text may straddle two
        end = len(self.chunks)
        found = text.encode() in b"".join(self.chunks[start:end])
        self.scanned = end
        return found

    def stop(self) -> list[str]:
        self.sock.shutdown(socket.SHUT_RDWR)
        self.thread.join(10)
        self.sock.close()
        return b"".join(self.chunks).decode("utf-8", "replace").split("\r\n")


def _process_roles(sup: Supervisor) -> dict[int, str]:
    import psutil

    out = {os.getpid(): "bench"}
    for name, proc in sup.procs:
        role = "api" if name == "api" else "worker" if name.startswith("worker") else ""
        if not role:
            continue
        out[proc.pid] = role if role == "api" else "worker parent"
        for child in psutil.Process(proc.pid).children(recursive=True):
            out[child.pid] = role if role == "api" else "worker child"
    return out


def port_roles(sup: Supervisor, valkey_port: int) -> dict[int, str]:
    """Client port -> the process that holds the connection (api, worker parent, worker
    child, bench), from the kernel's socket table."""
    import psutil

    pids = _process_roles(sup)
    out: dict[int, str] = {}
    for c in psutil.net_connections(kind="tcp"):
        if getattr(c.raddr, "port", None) == valkey_port and c.pid in pids:
            out[int(getattr(c.laddr, "port", -1))] = pids[c.pid]
    return out


# --- the stack ---------------------------------------------------------------------------------


def lanes(env: Mapping[str, str]) -> list[str]:
    """The queues a worker of this stack consumes, as the product's settings name them for
    the stack's environment (lane names are the product's to choose)."""
    with mock.patch.dict(os.environ, dict(env), clear=True):
        return list(Settings().queues)


@dataclass
class Fleet:
    base: str
    r: redis.Redis
    env: dict[str, str]
    sup: Supervisor
    log: IO[bytes]
    valkey_port: int
    workers: int = 0

    def grow(self, target: int) -> None:
        """Start workers up to `target` and wait until every one's child beats."""
        queues = lanes(self.env)
        for i in range(self.workers, target):
            argv = worker_argv(queues, name=f"fleet{i}@%h", loglevel="WARNING")
            self.sup.start(f"worker{i}", argv, env=self.env, cwd=ROOT, stdout=self.log.fileno())
        self.workers = target

        def ready() -> bool:
            resp = httpx.get(f"{self.base}/ready", timeout=5)
            return resp.status_code == 200 and len(resp.json()["workers"]) >= target

        wait_for(ready, 60 + 30 * target, f"{target} workers", interval=0.5)


@contextmanager
def fleet_stack(batch: int | None) -> Iterator[Fleet]:
    extra = {"INFERQ_ENGINE": "echo"}
    if batch:
        extra["INFERQ_MAX_BATCH_SIZE"] = str(batch)
    with stack(0, "tiny", False, **extra) as (base, _model, env, sup):
        url = env["INFERQ_REDIS_URL"]
        with (Path(env["INFERQ_HOME"]) / "fleet-workers.log").open("ab") as log:
            r = redis.Redis.from_url(url, decode_responses=True)
            port = int(url.rsplit(":", 1)[1].split("/")[0])
            yield Fleet(base, r, env, sup, log, port)


def _body(i: int, max_tokens: int) -> dict[str, Any]:
    return {
        "model": "tiny",
        "messages": [{"role": "user", "content": f"fleet {i}"}],
        "max_tokens": max_tokens,
    }


def finished(r: redis.Redis) -> int:
    """Jobs ended so far, by the metrics hash the transition script keeps: one read however
    many jobs are out (polling each job's record would be load of its own on the broker)."""
    raw = {str(k): str(v) for k, v in r.hgetall(keys.METRICS).items()}
    return sum(metrics.decode(raw, lanes=[]).finished.values())


def _commands(r: redis.Redis) -> int:
    return int(r.info("stats")["total_commands_processed"])


def settle(r: redis.Redis, idle: Usage, quiet_s: float = 1.5, limit_s: float = 20.0) -> None:
    """Wait until the broker's command rate has been back near its idle rate for `quiet_s`
    in a row: a worker parent checks its held messages once a second while its child is
    busy, so a single quiet half-second can come before the last acknowledgements."""
    threshold = 1.5 * sum(idle.calls.values()) / max(idle.seconds, 1e-9) + 20
    prev, t = _commands(r), time.monotonic()
    quiet_since: float | None = None
    deadline = t + limit_s
    while time.monotonic() < deadline:
        time.sleep(0.25)
        now, t2 = _commands(r), time.monotonic()
        if (now - prev) / (t2 - t) > threshold:
            quiet_since = None
        elif quiet_since is None:
            quiet_since = t
        elif t2 - quiet_since >= quiet_s:
            return
        prev, t = now, t2


@dataclass
class Ran:
    started: float
    ended: float | None
    ids: list[str]


def run_jobs(fl: Fleet, n: int, max_tokens: int) -> Ran:
    """n POST /v1/jobs (64 in flight) until the metrics hash counts n more ended."""
    start = finished(fl.r)
    bodies = [_body(i, max_tokens) for i in range(n)]
    t0 = time.time()
    ids, _ = asyncio.run(post_all(fl.base, bodies))
    deadline = time.monotonic() + 600
    while finished(fl.r) < start + n:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{start + n - finished(fl.r)} of {n} jobs unfinished after 600 s")
        time.sleep(0.05)
    return Ran(t0, None, ids)


def run_batch(fl: Fleet, n: int, max_tokens: int) -> Ran:
    """The same n requests as one OpenAI batch, from the upload to `completed`."""
    lines = "\n".join(
        json.dumps(
            {
                "custom_id": f"f{i}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": _body(i, max_tokens),
            }
        )
        for i in range(n)
    )
    with httpx.Client(base_url=fl.base, timeout=60) as c:
        t0 = time.time()
        f = c.post("/v1/files", files={"file": ("fleet.jsonl", lines.encode())}, data={"purpose": "batch"})
        f.raise_for_status()
        body = {
            "input_file_id": f.json()["id"],
            "endpoint": "/v1/chat/completions",
            "completion_window": "24h",
        }
        b = c.post("/v1/batches", json=body).json()
        while (b := c.get(f"/v1/batches/{b['id']}").json())["status"] not in (
            "completed",
            "failed",
            "cancelled",
        ):
            time.sleep(0.05)
        if b["status"] != "completed" or b["request_counts"]["completed"] != n:
            raise RuntimeError(f"batch ended {b['status']}: {b['request_counts']}")
    return Ran(t0, time.time(), [])


Runner = Callable[[Fleet, int, int], Ran]
PATHS: dict[str, Runner] = {"jobs": run_jobs, "batch": run_batch}


def idle_window(r: redis.Redis, seconds: float) -> Usage:
    before = snapshot(r)
    time.sleep(seconds)
    return snapshot(r).since(before)


def measure(fl: Fleet, path: str, n: int, max_tokens: int, idle: Usage) -> dict[str, Any]:
    """One backlog through `path`, Valkey's counters read around it."""
    before = snapshot(fl.r)
    ran = PATHS[path](fl, n, max_tokens)
    settle(fl.r, idle)
    used = snapshot(fl.r).since(before)
    ended = ran.ended if ran.ended is not None else last_finish(wait_done(fl.r, ran.ids))
    jobs_u = used.less_idle(idle)
    return {
        "path": path,
        "workers": fl.workers,
        "jobs": n,
        "seconds": round(ended - ran.started, 3),
        "jobs_per_s": round(n / (ended - ran.started), 1),
        "window_s": round(used.seconds, 3),
        "valkey_core_share": round(used.cpu_main_s / used.seconds, 3),
        "gross_valkey_cpu_ms_per_job": round(used.cpu_main_s * 1000 / n, 4),
        **per_job(jobs_u, n),
    }


def monitor_pass(fl: Fleet, n: int, max_tokens: int, idle: Usage, paths: list[str]) -> dict[str, Any]:
    """Who sends what, per job: an idle window then each path's backlog under MONITOR."""
    mon = Monitor(fl.valkey_port)
    seconds: dict[str, float] = {}
    for window in ["idle", *paths]:
        t = time.monotonic()
        fl.r.echo(MARK + window)
        if window == "idle":
            time.sleep(min(idle.seconds, 3.0))
        else:
            PATHS[window](fl, n, max_tokens)
            settle(fl.r, idle)
        seconds[window] = time.monotonic() - t
    fl.r.echo(MARK + "end")
    wait_for(lambda: mon.seen(MARK + "end"), 10, "monitor end mark")
    roles = port_roles(fl.sup, fl.valkey_port)
    roles[mon.port] = "monitor"
    lines = mon.stop()
    windows = parse_monitor(lines, roles, script_names(fl.r, shas_in(lines)))
    quiet = windows.get("idle", Tally(Counter(), Counter()))
    return {
        "jobs": n,
        "workers": fl.workers,
        "paths": {
            p: tally_per_job(
                windows.get(p, Tally(Counter(), Counter())), quiet, seconds[p] / seconds["idle"], n
            )
            for p in paths
        },
    }


def tally_per_job(run: Tally, idle: Tally, scale: float, jobs: int) -> dict[str, dict[str, float]]:
    """A MONITOR window less the idle one (times `scale`, the length ratio), per job: by
    process, by process and command, and by script and the command it ran."""
    by_role: Counter[str] = Counter()
    idle_role: Counter[str] = Counter()
    for counts, into in ((run.top, by_role), (idle.top, idle_role)):
        for (role, _), v in counts.items():
            into[role] += v
    return {
        "top_level_per_job": net_per_job(by_role, idle_role, scale, jobs),
        "by_command": {f"{r} {c}": v for (r, c), v in net_per_job(run.top, idle.top, scale, jobs).items()},
        "in_scripts": {f"{s} {c}": v for (s, c), v in net_per_job(run.lua, idle.lua, scale, jobs).items()},
    }


# --- the benchmark -------------------------------------------------------------------------------


def summarize(runs: list[dict[str, Any]], idle_by_workers: dict[int, float]) -> dict[str, Any]:
    """Capacity from the runs: the median CPU per job of each path, the idle cost of a
    worker from the slope of idle Valkey CPU against workers, and the goal's verdict (on the
    `/v1/jobs` path: the one every job takes; the batch path is cheaper per line or not)."""
    idle_ms = max(0.0, slope((w, v) for w, v in idle_by_workers.items()))
    out: dict[str, Any] = {"idle_valkey_ms_per_worker_s": round(idle_ms, 4), "capacity": {}}
    for path in sorted({r["path"] for r in runs}):
        cpu = statistics.median(r["valkey_cpu_ms_per_job"] for r in runs if r["path"] == path)
        out["capacity"][path] = {
            "valkey_cpu_ms_per_job": round(cpu, 4),
            **{f"workers_at_{rate:g}_per_s": round(capacity(cpu, rate, idle_ms), 1) for rate in RATES},
            **{f"workers_at_{rate:g}_per_s_jobs_only": round(capacity(cpu, rate), 1) for rate in RATES},
        }
    main = out["capacity"].get("jobs") or next(iter(out["capacity"].values()))
    out["goal_ms_per_job"] = round(1000 / (GOAL_WORKERS * GOAL_RATE), 3)
    out["goal_met"] = main[f"workers_at_{GOAL_RATE:g}_per_s"] >= GOAL_WORKERS
    return out


def fleet(
    workers: tuple[int, ...] = (1, 2, 4, 8),
    n: int = 2000,
    max_tokens: int = 16,
    batch: int | None = None,
    idle_s: float = 5.0,
    batch_api: bool = True,
    monitor_n: int = 300,
    aof: bool = True,
) -> dict[str, Any]:
    """`aof` False turns the embedded Valkey's append-only file off (CONFIG SET) to show
    its share: every write a script makes is also appended there."""
    paths = ["jobs", "batch"] if batch_api else ["jobs"]
    runs: list[dict[str, Any]] = []
    idle_by_workers: dict[int, float] = {}
    print(HEAD + "\n|" + "---|" * 10, flush=True)
    with fleet_stack(batch) as fl:
        if not aof:
            fl.r.config_set("appendonly", "no")
        for target in sorted(set(workers)):
            fl.grow(target)
            time.sleep(1.0)  # the last worker's start-up traffic
            idle = idle_window(fl.r, idle_s)
            idle_by_workers[target] = idle.cpu_main_s * 1000 / idle.seconds
            for path in paths:
                runs.append(measure(fl, path, n, max_tokens, idle))
                print(row(runs[-1], idle_by_workers[target]), flush=True)
        mon = monitor_pass(fl, monitor_n, max_tokens, idle, paths) if monitor_n else None
        probe = round_trip_cost(fl.r)
        max_batch = int(fl.env.get("INFERQ_MAX_BATCH_SIZE") or Settings().max_batch_size)
    res: dict[str, Any] = {
        "n": n,
        "max_tokens": max_tokens,
        "max_batch_size": max_batch,
        "idle_s": idle_s,
        "aof": aof,
        "idle_valkey_ms_per_s_by_workers": {w: round(v, 4) for w, v in idle_by_workers.items()},
        "runs": runs,
        "round_trip_cost": probe,
        **summarize(runs, idle_by_workers),
        "monitor": mon,
    }
    print("\n".join(section(res)))
    return res


# --- tables --------------------------------------------------------------------------------------

HEAD = (
    "| path | workers | jobs | jobs/s end to end | Valkey CPU ms/job (main thread, less idle) "
    "| kernel share of it | commands/job | round trips/job | Valkey busy (share of a core) "
    "| idle Valkey ms/s |"
)


def row(run: Mapping[str, Any], idle_ms_per_s: float | None = None) -> str:
    idle = "" if idle_ms_per_s is None else f"{idle_ms_per_s:.2f}"
    return (
        f"| {run['path']} | {run['workers']} | {run['jobs']} | {run['jobs_per_s']} | "
        f"{run['valkey_cpu_ms_per_job']:.3f} | {run.get('valkey_sys_share', '')} | {run['commands_per_job']} "
        f"| {run.get('round_trips_per_job', '')} | {run['valkey_core_share']} | {idle} |"
    )


def section(res: Mapping[str, Any]) -> list[str]:
    """The result as markdown: the runs, the capacity and the verdict, the costliest
    commands of the largest /v1/jobs run, and the MONITOR pass."""
    idle = res.get("idle_valkey_ms_per_s_by_workers", {})
    lines = [HEAD, "|" + "---|" * 10]
    lines += [row(r, idle.get(r["workers"], idle.get(str(r["workers"])))) for r in res["runs"]]
    lines += [
        "",
        "| path | Valkey CPU ms/job | workers per core at 20 jobs/s | at 50 jobs/s | (jobs only: 20 / 50) |",
    ]
    lines += ["|---|---|---|---|---|"]
    for path, c in res["capacity"].items():
        lines.append(
            f"| {path} | {c['valkey_cpu_ms_per_job']} | {c['workers_at_20_per_s']} | "
            f"{c['workers_at_50_per_s']} | {c['workers_at_20_per_s_jobs_only']} / "
            f"{c['workers_at_50_per_s_jobs_only']} |"
        )
    verdict = "met" if res["goal_met"] else "NOT met"
    lines += [
        "",
        f"Goal: one Valkey core carries >= {GOAL_WORKERS} workers at {GOAL_RATE:g} jobs/s each "
        f"(<= {res['goal_ms_per_job']} ms of Valkey CPU per job): {verdict}. Idle cost of a worker: "
        f"{res['idle_valkey_ms_per_worker_s']} ms of Valkey CPU per second.",
    ]
    if rt := res.get("round_trip_cost"):
        lines += [
            "",
            f"On this server a round trip costs Valkey {rt['us_per_round_trip']} µs of CPU (a PING on its "
            f"own) and a command pipelined with 19 others {rt['us_per_pipelined_command']} µs.",
        ]
    lines += _top_table(res["runs"])
    if res.get("monitor"):
        lines += _monitor_tables(res["monitor"])
    return lines


def _top_table(runs: list[Mapping[str, Any]]) -> list[str]:
    jobs = [r for r in runs if r["path"] == "jobs"]
    if not jobs:
        return []
    big = max(jobs, key=lambda r: r["workers"])
    lines = [
        "",
        f"Costliest commands, `/v1/jobs`, {big['workers']} workers (commandstats less idle; EVALSHA and "
        "EXEC include the commands they run, which are also counted under their own names):",
        "",
        "| command | calls/job | µs/job |",
        "|---|---|---|",
    ]
    lines += [f"| {t['command']} | {t['calls_per_job']} | {t['us_per_job']} |" for t in big["top_commands"]]
    return lines


def _monitor_tables(mon: Mapping[str, Any], top: int = 15) -> list[str]:
    lines: list[str] = []
    for path, p in mon["paths"].items():
        roles = ", ".join(f"{r} {v}" for r, v in p["top_level_per_job"].items())
        lines += [
            "",
            f"MONITOR, `{path}` ({mon['jobs']} jobs, {mon['workers']} workers): commands sent per job "
            f"by process: {roles} (pipelined commands count one each).",
            "",
            "| sent by, command | per job |",
            "|---|---|",
            *[f"| {k} | {v} |" for k, v in list(p["by_command"].items())[:top]],
            "",
            "| script, command it runs | per job |",
            "|---|---|",
            *[f"| {k} | {v} |" for k, v in list(p["in_scripts"].items())[:top]],
        ]
    return lines
