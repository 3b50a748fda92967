"""Batch benchmark: a large JSONL file through Files + Batches + workers, beside the same
lines run through the engine directly, in one run.

Prints the API's peak memory during upload (to show it does not grow with the file), time
from batch creation to the first finished line, and lines/s end to end vs direct.

    python -m bench.batch_throughput [--lines 20000] [--max-tokens 8] [--batch-size 8]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import httpx

from bench._stack import stack


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def make_file(path: Path, lines: int, max_tokens: int) -> None:
    with path.open("w") as fh:
        for i in range(lines):
            words = " ".join(["word"] * (1 + i % 23))
            body = {
                "model": "tiny",
                "messages": [{"role": "user", "content": f"{i} {words}"}],
                "max_tokens": max_tokens,
                "temperature": 0,
            }
            fh.write(
                json.dumps(
                    {"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions", "body": body}
                )
                + "\n"
            )


def direct(model: Path, path: Path, batch_size: int) -> float:
    from core.config import Settings
    from models.spec import ModelSpec
    from workers.engine import GenParams, GenRequest
    from workers.engines.swift import SwiftEngine

    engine = SwiftEngine(
        ModelSpec(path=model, model_type="qwen2", template="qwen2_5", demo=True),
        Settings(max_batch_size=batch_size, served_model_name="tiny"),
    )
    reqs = []
    for raw in path.read_text().splitlines():
        body = json.loads(raw)["body"]
        reqs.append(GenRequest(body["messages"], GenParams(max_tokens=body["max_tokens"], temperature=0)))
    t0 = time.perf_counter()
    for i in range(0, len(reqs), 512):
        engine.generate(reqs[i : i + 512])
    return len(reqs) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lines", type=int, default=20_000)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args()
    with stack(INFERQ_MAX_BATCH_SIZE=str(args.batch_size)) as (base, model, env, sup):
        path = Path(env["INFERQ_HOME"]) / "bench.jsonl"
        make_file(path, args.lines, args.max_tokens)
        size_mb = path.stat().st_size / 2**20
        api_pid = next(p.pid for name, p in sup.procs if name == "api")
        with httpx.Client(base_url=base, timeout=600) as client:
            before = _rss_mb(api_pid)
            with path.open("rb") as fh:
                f = client.post(
                    "/v1/files", files={"file": ("bench.jsonl", fh)}, data={"purpose": "batch"}
                ).json()
            peak = _peak_rss_mb(api_pid)
            t0 = time.perf_counter()
            b = client.post(
                "/v1/batches",
                json={
                    "input_file_id": f["id"],
                    "endpoint": "/v1/chat/completions",
                    "completion_window": "24h",
                },
            ).json()
            first = None
            while True:
                b = client.get(f"/v1/batches/{b['id']}").json()
                c = b["request_counts"]
                if first is None and c["completed"] + c["failed"] > 0:
                    first = time.perf_counter() - t0
                if b["status"] in ("completed", "failed", "cancelled", "expired"):
                    break
                time.sleep(0.2)
            elapsed = time.perf_counter() - t0
        queue_rate = args.lines / elapsed
        direct_rate = direct(model, path, args.batch_size)
    print(
        json.dumps(
            {
                "lines": args.lines,
                "file_mb": round(size_mb, 1),
                "status": b["status"],
                "counts": b["request_counts"],
                "api_rss_before_mb": round(before, 1),
                "api_peak_rss_mb": round(peak, 1),
                "first_line_s": round(first or 0, 2),
                "queue_lines_per_s": round(queue_rate, 1),
                "direct_lines_per_s": round(direct_rate, 1),
            }
        )
    )
    print(f"upload of {args.lines} lines: API RSS {before:.0f} MB before, peak {peak:.0f} MB")
    print(f"first finished line {first:.2f}s after batch creation")
    print(
        f"end to end {queue_rate:.1f} lines/s vs engine direct {direct_rate:.1f} lines/s "
        f"-> ratio {queue_rate / direct_rate:.2f}"
    )


if __name__ == "__main__":
    main()
