"""What the queue costs the engine.

`chat`: 64 closed-loop clients calling `POST /v1/chat/completions` (non-stream, temperature
0, max_tokens 64, prompts of 4-60 words) against inferq (worker, API and Flower), against
`swift deploy` on the same model, and against ms-swift's `TransformersEngine.infer` called
directly with the same batch size; the tiny model (overhead-bound) and the small one
(compute-bound), side by side in one run.

`cpu`: CPU time per completed job of each process of the stack (API, worker parent, worker
child, Valkey, Flower) under the same load, read from /proc, and what the idle stack uses.
"""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench._stack import ROOT, bench_model, stack
from bench.mixed import closed_loop, swift_deploy_server
from cli.processes import free_port
from models.demo import DEMO_MODEL_TYPE, DEMO_TEMPLATE

_WORDS = [
    "the",
    "queue",
    "runs",
    "each",
    "prompt",
    "through",
    "a",
    "warm",
    "engine",
    "and",
    "writes",
    "its",
    "tokens",
    "back",
    "to",
    "redis",
]
_TICK = os.sysconf("SC_CLK_TCK")


def chat_bodies(n: int, max_tokens: int = 64, offset: int = 0) -> list[dict[str, Any]]:
    """Prompts of 4 to 60 words, deterministic; the same settings for every request."""
    out = []
    for i in range(offset, offset + n):
        words = 4 + (i * 37) % 57
        text = " ".join(_WORDS[(i + j) % len(_WORDS)] for j in range(words))
        out.append(
            {
                "model": "tiny",
                "messages": [{"role": "user", "content": text}],
                "max_tokens": max_tokens,
                "temperature": 0,
            }
        )
    return out


class DirectSwift:
    """ms-swift's own engine in this process, the requests in calls of `batch` (one list of
    all of them runs slower: ms-swift does not chunk it into full batches by itself)."""

    def __init__(self, model: Path, batch: int) -> None:
        from swift.infer_engine import TransformersEngine

        self.batch = batch
        self.engine = TransformersEngine(
            str(model), model_type=DEMO_MODEL_TYPE, template_type=DEMO_TEMPLATE, max_batch_size=batch
        )

    def run(self, bodies: list[dict[str, Any]]) -> dict[str, float]:
        from swift.infer_engine import InferRequest, RequestConfig

        reqs = [InferRequest(messages=b["messages"]) for b in bodies]
        cfg = RequestConfig(max_tokens=bodies[0]["max_tokens"], temperature=0)
        t0 = time.perf_counter()
        outs = [
            o
            for i in range(0, len(reqs), self.batch)
            for o in self.engine.infer(reqs[i : i + self.batch], cfg, use_tqdm=False)
        ]
        wall = time.perf_counter() - t0
        toks = sum(o.usage.completion_tokens for o in outs)
        return {"requests_per_s": len(reqs) / wall, "tokens_per_s": toks / wall}


def chat(
    sizes: tuple[str, ...] = ("tiny", "small"),
    batch: int = 32,
    clients: int = 64,
    n: dict[str, int] | None = None,
    rounds: int = 3,
) -> dict[str, Any]:
    """Medians of `rounds` rounds; in each, inferq, `swift deploy` and the engine called
    directly take turns (all three loaded at once, each idle while another runs), in an
    order that rotates: this VM's speed drifts over tens of seconds."""
    counts = n or {"tiny": 512, "small": 96}
    res: dict[str, Any] = {
        "max_batch_size": batch,
        "clients": clients,
        "max_tokens": 64,
        "requests": counts,
        "rounds": rounds,
    }
    for size in sizes:
        model = bench_model(size)  # EOS-free: every request runs to its 64 tokens on each side
        reqs = chat_bodies(counts[size])
        got: dict[str, list[float]] = {"inferq": [], "swift_deploy": [], "direct": []}
        with (
            stack(size=size, flower=True, INFERQ_MAX_BATCH_SIZE=str(batch)) as (base, _m, _env, _sup),
            swift_deploy_server(model, batch) as sd_base,
        ):
            direct = DirectSwift(model, batch)
            warm = chat_bodies(clients, offset=10_000)
            closed_loop(base, warm, clients)
            closed_loop(sd_base, warm, clients)
            direct.run(warm[:batch])
            names = list(got)
            for r in range(rounds):
                for name in names[r % 3 :] + names[: r % 3]:
                    if name == "inferq":
                        one = closed_loop(base, reqs, clients)
                    elif name == "swift_deploy":
                        one = closed_loop(sd_base, reqs, clients)
                    else:
                        one = direct.run(reqs)
                    got[name].append(one["requests_per_s"])
        med = {k: statistics.median(v) for k, v in got.items()}
        row = {
            "inferq_requests_per_s": round(med["inferq"], 2),
            "swift_deploy_requests_per_s": round(med["swift_deploy"], 2),
            "direct_requests_per_s": round(med["direct"], 2),
            "inferq_over_direct": round(med["inferq"] / med["direct"], 3),
            "swift_deploy_over_direct": round(med["swift_deploy"] / med["direct"], 3),
            "inferq_over_swift_deploy": round(med["inferq"] / med["swift_deploy"], 3),
            "runs": {k: [round(x, 2) for x in v] for k, v in got.items()},
        }
        res[size] = row
        print(
            f"chat {size}: inferq {row['inferq_requests_per_s']} req/s "
            f"(x{row['inferq_over_direct']} of direct), "
            f"swift deploy {row['swift_deploy_requests_per_s']} (x{row['swift_deploy_over_direct']}), "
            f"direct {row['direct_requests_per_s']}; runs {row['runs']}",
            flush=True,
        )
    return res


def cpu_s(pid: int) -> float:
    """utime + stime of one process, seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(entry.name))
            except OSError:
                continue
    return out


def _snapshot(pids: dict[str, list[int]]) -> dict[str, float]:
    return {name: sum(cpu_s(p) for p in ps) for name, ps in pids.items()}


def _run_stack(home: Path, model: Path, batch: int, verbose: bool) -> tuple[subprocess.Popen[bytes], str]:
    """`inferq run` as a user starts it (Flower on), serving the bench model."""
    port, fport = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("INFERQ_")}
    env["INFERQ_HOME"] = str(home)
    argv = [sys.executable, "-m", "cli.main", "run", "--port", str(port), "--flower-port", str(fport)]
    argv += ["--model", str(model), "--model-type", DEMO_MODEL_TYPE, "--template", DEMO_TEMPLATE]
    argv += [
        "--served-model-name",
        "tiny",
        "--max-batch-size",
        str(batch),
        *(["--verbose"] if verbose else []),
    ]
    log = (home / "run.log").open("wb")
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 240
    while "READY  API" not in (home / "run.log").read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("inferq run did not start: " + (home / "run.log").read_text()[-2000:])
        time.sleep(0.2)
    return proc, f"http://127.0.0.1:{port}"


def _roles(run_pid: int) -> dict[str, list[int]]:
    """The stack's processes by role, from their command lines."""
    roles: dict[str, list[int]] = {}
    for pid in children(run_pid):
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        if "valkey" in cmd:
            roles["valkey"] = [pid]
        elif " flower" in cmd:
            roles["flower"] = [pid]
        elif "api.serve" in cmd:
            roles["api"] = [pid, *children(pid)]
        elif " worker" in cmd:
            roles["worker_parent"] = [pid]
            roles["worker_child"] = children(pid)
    return roles


def _cpu_once(model: Path, n: int, clients: int, batch: int, idle_s: float, verbose: bool) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="inferq-bench-cpu-") as tmp:
        proc, base = _run_stack(Path(tmp), model, batch, verbose)
        try:
            pids = _roles(proc.pid)
            closed_loop(base, chat_bodies(clients, offset=10_000), clients)  # warm-up
            time.sleep(5)  # the warm-up's last acknowledgements and Flower's refresh settle
            before = _snapshot(pids)
            time.sleep(idle_s)  # the idle stack: what it burns doing nothing
            idle = {k: (v - before[k]) / idle_s * 100 for k, v in _snapshot(pids).items()}
            before = _snapshot(pids)
            closed_loop(base, chat_bodies(n), clients)
            per_job = {k: (v - before[k]) * 1000 / n for k, v in _snapshot(pids).items()}
        finally:
            proc.send_signal(signal.SIGINT)
            proc.wait(60)
    outside = sum(v for k, v in per_job.items() if k != "worker_child")
    return {
        "cpu_ms_per_job": {k: round(v, 2) for k, v in per_job.items()},
        "cpu_ms_per_job_outside_engine": round(outside, 2),
        "idle_percent_of_a_core": {k: round(v, 3) for k, v in idle.items()},
        "idle_percent_total": round(sum(idle.values()), 3),
    }


def cpu(n: int = 512, clients: int = 64, batch: int = 32, idle_s: float = 30.0) -> dict[str, Any]:
    """Through `inferq run` (Flower on), with its default console and with --verbose."""
    model = bench_model("tiny")
    res: dict[str, Any] = {"n": n, "clients": clients, "max_batch_size": batch}
    for verbose in (False, True):
        got = _cpu_once(model, n, clients, batch, idle_s, verbose)
        res["verbose" if verbose else "default"] = got
        print(
            f"cpu per job (ms, {'--verbose' if verbose else 'default console'}): {got['cpu_ms_per_job']}; "
            f"outside the engine child {got['cpu_ms_per_job_outside_engine']}; idle stack "
            f"{got['idle_percent_total']} % of a core {got['idle_percent_of_a_core']}",
            flush=True,
        )
    return res
