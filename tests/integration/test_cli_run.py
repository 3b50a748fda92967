"""`inferq run` as a newcomer uses it: embedded Valkey, demo model, worker, API, Flower; a job
goes through; Ctrl-C stops everything and leaves no process behind."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import redis

from cli.processes import free_port
from models.demo import build_demo_model
from tests.support import ROOT, procs
from tests.support.stack import cli_env, proc_file, wait_ready, with_db
from tests.support.wait import eventually
from workers.engines.echo import STALL_TRIGGER


def _procs_with(marker: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        if marker.encode() in proc_file(int(entry.name), "environ"):
            found.append(int(entry.name))
    return found


def _described(pids: list[int]) -> list[str]:
    """Each process with its state and command line, to tell which one outlived the run."""
    out = []
    for pid in pids:
        argv = proc_file(pid, "cmdline").replace(b"\0", b" ").decode(errors="replace")[:160]
        state = next(
            (line for line in proc_file(pid, "status").decode().splitlines() if line.startswith("State")), ""
        )
        out.append(f"{pid} {state} {argv}")
    return out


def _start_run(home: Path, log_path: Path, *args: str) -> subprocess.Popen[bytes]:
    env = cli_env(INFERQ_HOME=str(home), INFERQ_HEARTBEAT_INTERVAL_S="0.5")
    with log_path.open("ab") as log:
        return procs.popen(
            [sys.executable, "-m", "cli.main", "run", *args],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def _wait_banner(proc: subprocess.Popen[bytes], log_path: Path, timeout: float = 180) -> None:
    """Until `inferq run` prints its READY banner."""

    def ready() -> bool:
        assert proc.poll() is None, log_path.read_text()[-3000:]
        return "READY  API" in log_path.read_text(errors="replace")

    eventually(ready, timeout=timeout, interval=0.1, message=lambda: log_path.read_text()[-3000:])


def _status(base: str, job: str) -> str:
    return str(httpx.get(f"{base}/v1/jobs/{job}", timeout=10).json()["status"])


def _wait_status(base: str, job: str, wanted: tuple[str, ...], timeout: float = 60) -> str:
    def reached() -> str | None:
        status = _status(base, job)
        return status if status in wanted else None

    return eventually(reached, timeout=timeout, message=lambda: f"job {job} is {_status(base, job)}")


def _kill_9(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL: `inferq run` gets no chance to clean up after itself."""
    proc.kill()
    proc.wait()


def _wait_all_gone(home: Path) -> None:
    """Until no process started for `home` (its environment names it) is left."""
    eventually(
        lambda: not _procs_with(f"INFERQ_HOME={home}"),
        timeout=30,
        interval=0.2,
        message=lambda: f"processes left: {_described(_procs_with(f'INFERQ_HOME={home}'))}",
    )


def test_run_command_serves_a_job_and_ctrl_c_stops_everything(tmp_path: Path) -> None:
    """Also the console a newcomer reads: the READY banner comes last, no start-up noise
    (ms-swift's trust_remote_code notices, Flower's failed inspects, Celery's banner), and
    Ctrl-C with a job in flight prints no traceback; the job runs on the next start. At the
    default level, from start to Ctrl-C, warnings and errors only (README): no INFO line of
    the supervisor's or any process's, no Celery "Warm shutdown"."""
    home = tmp_path / "inferq-home"
    # The demo model `inferq run` would build, made EOS-free first (it reuses a build it finds):
    # a sampled random model may say EOS within a few tokens, and the job must still be in flight.
    build_demo_model(home / "demo-model", eos_free=True)
    api_port, flower_port = free_port(), free_port()
    log_path = tmp_path / "run.log"
    proc = _start_run(home, log_path, "--port", str(api_port), "--flower-port", str(flower_port))
    base = f"http://127.0.0.1:{api_port}"
    try:
        _wait_banner(proc, log_path)  # what a user waits for
        models = httpx.get(f"{base}/v1/models").json()["data"][0]
        assert models["id"] == "inferq-demo" and models["demo"] is True
        body = {"model": "inferq-demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
        job = httpx.post(f"{base}/v1/jobs", json=body).json()
        assert _wait_status(base, job["id"], ("succeeded", "failed")) == "succeeded"
        _readme_shell_examples(tmp_path / "shell", base)
        # `inferq keys create` finds the running embedded Valkey by itself (a new port each start)
        made = procs.run(
            [sys.executable, "-m", "cli.main", "keys", "create", "alice"],
            cwd=ROOT,
            env=cli_env(INFERQ_HOME=str(home)),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert made.returncode == 0 and made.stdout.startswith("iq-"), made.stderr
        valkey = redis.Redis.from_url((home / "valkey" / "url").read_text())
        assert list(valkey.scan_iter(match="inferq:apikey:*"))
        assert httpx.get(f"http://127.0.0.1:{flower_port}/api/workers", timeout=10).status_code == 200
        assert len(_procs_with(f"INFERQ_HOME={home}")) >= 4  # valkey, worker parent+child, api, flower
        # four rows of 1900 tokens: still generating when Ctrl-C reaches the worker, about 2 s
        # later (Flower and the API stop first), on a fast machine too
        long = {**body, "max_tokens": 1900, "temperature": 1.0, "n": 4}
        in_flight = httpx.post(f"{base}/v1/jobs", json=long).json()["id"]
        _wait_status(base, in_flight, ("running",))
        started = log_path.read_text(errors="replace")
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=60)
    text = log_path.read_text(errors="replace")
    assert code == 0, text[-3000:]
    assert "DEMO" in text and "gibberish" in text.lower()
    assert "SERVING THE DEMO MODEL" in text, text[-3000:]  # the worker child's own warning
    assert started.rstrip().splitlines()[-1].startswith("====="), started[-2000:]  # READY banner last
    assert "READY  API" in started
    for noise in ("trust_remote_code", "torch_dtype", "Inspect method", "-------------- ", "Traceback"):
        assert noise not in text, (noise, text[-3000:])
    _only_warnings_and_errors(text)
    assert "WorkerLostError" not in text
    if "sending them again" in text:  # the child was mid-generation: one line replaces them
        assert "stopped with a job in flight" in text, text[-3000:]
    assert _procs_with(f"INFERQ_HOME={home}") == []
    assert not (home / "valkey" / "url").exists()  # said only while it runs

    proc = _start_run(home, log_path, "--port", str(api_port), "--no-flower")
    try:
        wait_ready(base, timeout=180)
        assert _wait_status(base, in_flight, ("succeeded", "failed"), timeout=120) == "succeeded"
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0


def _only_warnings_and_errors(console: str) -> None:
    """No INFO or DEBUG line, in any process's format (ours "... INFO name:", Celery's
    "[...: INFO/MainProcess]", uvicorn's "INFO:", ms-swift's "[INFO:swift]"), and no
    "Warm shutdown", which Celery writes to stdout at any level."""
    chatty = [line for line in console.splitlines() if re.search(r"\b(INFO|DEBUG)\b|Warm shutdown", line)]
    assert not chatty, chatty


def _readme_shell_examples(workdir: Path, base: str) -> None:
    """README's "From the shell" block, run as written from a checkout's root (a `.venv` link
    stands in for it), against this run's API through INFERQ_URL; its `batch_…`
    placeholders get the id the submit printed."""
    readme = (ROOT / "README.md").read_text()
    block = readme[readme.index("From the shell:") :].split("```bash\n", 1)[1].split("```", 1)[0]
    lines = block.splitlines()
    workdir.mkdir()
    (workdir / ".venv").symlink_to(ROOT / ".venv")
    env = cli_env(INFERQ_URL=base)

    def bash(script: str) -> subprocess.CompletedProcess[str]:
        done = procs.run(
            ["bash", "-euo", "pipefail", "-c", script],
            cwd=workdir,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        return done

    submitted = bash("\n".join(line for line in lines if "batch_…" not in line))
    # the summary line: `ID  STATUS  done N  failed N  total N  output F  errors F`
    summary = submitted.stdout.strip().splitlines()[-1].split()
    batch = {"id": summary[0], "status": summary[1]}
    assert batch["status"] == "completed" and batch["id"].startswith("batch_"), submitted.stdout
    out = [json.loads(line) for line in (workdir / "out.jsonl").read_text().splitlines()]
    assert sorted(line["custom_id"] for line in out) == ["q1", "q2"]
    assert all(line["response"]["status_code"] == 200 for line in out)
    later = [line.replace("batch_…", batch["id"]) for line in lines if "batch_…" in line]
    assert later and batch["id"] in bash("\n".join([lines[0], *later])).stdout


def _ppid(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def test_run_heals_a_killed_worker_and_dies_with_no_orphans(tmp_path: Path) -> None:
    """kill -9 of the worker's main process: `inferq run` starts it again and every job
    accepted before completes; kill -9 of `inferq run` itself: nothing it started lives on."""
    home = tmp_path / "inferq-home"
    api_port = free_port()
    env = cli_env(INFERQ_HOME=str(home), INFERQ_HEARTBEAT_INTERVAL_S="0.5", INFERQ_LIVENESS_S="3")
    log_path = tmp_path / "run.log"
    with log_path.open("wb") as log:
        proc = procs.popen(
            [sys.executable, "-m", "cli.main", "run", "--port", str(api_port), "--no-flower"],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{api_port}"
    try:
        _wait_banner(proc, log_path)  # not just /ready: a worker dying before `inferq run` is up ends it
        body = {"model": "inferq-demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 200}
        jobs = [httpx.post(f"{base}/v1/jobs", json=body).json()["id"] for _ in range(6)]
        child = httpx.get(f"{base}/ready").json()["workers"][0]["pid"]
        os.kill(_ppid(child), signal.SIGKILL)  # the Celery parent, as the OOM killer would

        def finished() -> list[str] | None:
            statuses = [_status(base, job) for job in jobs]
            return statuses if all(s in ("succeeded", "failed") for s in statuses) else None

        statuses = eventually(
            finished, timeout=150, interval=0.2, message=lambda: log_path.read_text(errors="replace")[-3000:]
        )
        assert statuses == ["succeeded"] * len(jobs)
        assert proc.poll() is None  # still up
        assert "worker exited" in log_path.read_text(errors="replace")
        # a heartbeat that outlives its worker in the AOF, as one does for liveness_s after kill -9
        url = (home / "valkey" / "url").read_text()  # the console no longer says it (INFO)
        ghost = {"worker_id": "ghost", "pid": 1, "started_at": time.time() - 100, "at": time.time()}
        redis.Redis.from_url(url).set("inferq:worker:ghost", json.dumps(ghost), px=120_000)
    finally:
        _kill_9(proc)
    _wait_all_gone(home)
    # started again on the same home at once: the lock died with the run, and READY waits for
    # this run's own worker, not the ghost's beat
    again = tmp_path / "again.log"
    proc = _start_run(home, again, "--port", str(api_port), "--no-flower")
    try:
        _wait_banner(proc, again)
        text = again.read_text(errors="replace")
        assert text.index("SERVING THE DEMO MODEL") < text.index("READY  API"), text[-3000:]
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)


def test_a_killed_run_leaves_no_worker_finishing_its_task(tmp_path: Path) -> None:
    """kill -9 of `inferq run` while its worker runs a job that never ends (the echo engine's
    stall prompt, which only the 120 s stall watchdog would end): the worker does not wait for
    it in a graceful shutdown; every process goes at once."""
    home = tmp_path / "inferq-home"
    api_port = free_port()
    log_path = tmp_path / "run.log"
    proc = _start_run(home, log_path, "--engine", "echo", "--port", str(api_port), "--no-flower")
    base = f"http://127.0.0.1:{api_port}"
    try:
        _wait_banner(proc, log_path)
        body = {"model": "inferq-demo", "messages": [{"role": "user", "content": STALL_TRIGGER}]}
        job = httpx.post(f"{base}/v1/jobs", json=body).json()["id"]
        _wait_status(base, job, ("running",))
        assert _procs_with(f"INFERQ_HOME={home}")  # the check below can see them
    finally:
        _kill_9(proc)
    _wait_all_gone(home)


def test_worker_and_api_started_on_their_own_serve_a_job(
    tmp_path: Path, redis_url: str, demo_model: Path
) -> None:
    """How a user adds a GPU host: `inferq worker` and `inferq api` against one Redis."""
    env = cli_env(INFERQ_HOME=str(tmp_path / "home"), INFERQ_HEARTBEAT_INTERVAL_S="0.5")
    missing = procs.run(
        [sys.executable, "-m", "cli.main", "worker"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert missing.returncode == 2 and "needs --redis-url" in missing.stdout + missing.stderr
    open_api = procs.run(
        [
            sys.executable,
            "-m",
            "cli.main",
            "api",
            "--redis-url",
            "redis://127.0.0.1:1/0",
            "--host",
            "0.0.0.0",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert open_api.returncode == 2 and "without API keys" in open_api.stdout + open_api.stderr
    url = with_db(redis_url, 7)
    redis.Redis.from_url(url).flushdb()
    model = [
        "--model",
        str(demo_model),
        "--model-type",
        "qwen2",
        "--template",
        "qwen2_5",
        "--served-model-name",
        "tiny",
    ]
    port = free_port()
    sup = procs.supervisor()
    log = (tmp_path / "serve.log").open("wb")
    try:
        sup.start(
            "worker",
            [sys.executable, "-m", "cli.main", "worker", "--redis-url", url, *model],
            env=env,
            cwd=ROOT,
            stdout=log.fileno(),
        )
        sup.start(
            "api",
            [sys.executable, "-m", "cli.main", "api", "--redis-url", url, "--port", str(port), *model],
            env=env,
            cwd=ROOT,
            stdout=log.fileno(),
        )
        base = f"http://127.0.0.1:{port}"
        wait_ready(base, timeout=180)
        job = httpx.post(
            f"{base}/v1/jobs",
            json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5},
        ).json()["id"]

        def succeeded() -> bool:
            status = httpx.get(f"{base}/v1/jobs/{job}").json()["status"]
            assert status not in ("failed", "cancelled"), status
            return bool(status == "succeeded")

        eventually(succeeded, timeout=60, interval=0.1, message=lambda: _status(base, job))
    finally:
        sup.stop_all()
        log.close()


def test_a_crash_loop_ends_the_run_with_a_clear_error(tmp_path: Path) -> None:
    """The API is killed and its port taken by another program: every restart fails to
    bind. After MAX_RESTARTS in the window `inferq run` stops everything and says which
    process could not stay up, instead of restarting it forever."""
    import socket

    home, log_path, port = tmp_path / "home", tmp_path / "run.log", free_port()
    proc = _start_run(home, log_path, "--port", str(port), "--no-flower", "--engine", "echo")
    squatter = socket.socket()
    squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # past the API's TIME_WAIT ones
    try:
        _wait_banner(proc, log_path)
        api = [pid for pid in _procs_with(f"INFERQ_HOME={home}") if b"api.serve" in proc_file(pid, "cmdline")]
        assert api, log_path.read_text()[-2000:]
        os.kill(api[0], signal.SIGKILL)

        def take_the_port() -> bool:  # free once the killed API is gone (OSError until then)
            squatter.bind(("127.0.0.1", port))
            return True

        eventually(take_the_port, timeout=10, message="the killed API's port free")
        squatter.listen()
        code = proc.wait(timeout=120)
    finally:
        squatter.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log_path.read_text(errors="replace")
    assert code == 1, text[-3000:]
    assert "api exited (code 3) 6 times in 300 s: it cannot stay up; stopping everything" in text, text[
        -3000:
    ]
    assert "starting it again in 16 s" in text  # with backoff
    assert _procs_with(f"INFERQ_HOME={home}") == []
