"""Streaming benchmark: XADD -> SSE delivery latency, and time-to-first-token of the queue
path beside the engine called directly, measured side by side in one run.

    python -m bench.stream_latency [--requests 20] [--streams 8] [--max-tokens 64]
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time

import httpx

from bench._stack import stack


def _pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def delivery_latencies(base: str, streams: int, max_tokens: int) -> list[float]:
    """ms from the worker's XADD (the entry id's timestamp) to the SSE client's receipt."""
    lat: list[float] = []
    lock = threading.Lock()

    def follow(i: int) -> None:
        body = {
            "model": "tiny",
            "messages": [{"role": "user", "content": f"bench {i}"}],
            "max_tokens": max_tokens,
        }
        job = httpx.post(f"{base}/v1/jobs", json=body).json()
        with httpx.stream("GET", f"{base}/v1/jobs/{job['id']}/events", timeout=60) as resp:
            event, entry = "", ""
            for line in resp.iter_lines():
                now_ms = time.time() * 1000
                if line.startswith("id:"):
                    entry = line[3:].strip()
                elif line.startswith("event:"):
                    event = line[6:].strip()
                elif line.startswith("data:") and event == "token":
                    with lock:
                        lat.append(now_ms - int(entry.split("-")[0]))
                elif line.startswith("data:") and event in ("done", "error", "cancelled"):
                    return

    threads = [threading.Thread(target=follow, args=(i,)) for i in range(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return lat


def ttft_queue(base: str, n: int, max_tokens: int) -> list[float]:
    out: list[float] = []
    client = httpx.Client(timeout=60)  # one client: creating one costs ~100 ms (TLS context)
    for i in range(n):
        body = {
            "model": "tiny",
            "messages": [{"role": "user", "content": f"ttft {i}"}],
            "max_tokens": max_tokens,
            "stream": True,
        }
        t0 = time.perf_counter()
        with client.stream("POST", f"{base}/v1/chat/completions", json=body) as resp:
            for line in resp.iter_lines():
                # read to the end: leaving early would leave the job running into the next one
                if line.startswith("data: {") and len(out) == i:
                    choices = json.loads(line[6:])["choices"]
                    if choices and choices[0]["delta"].get("content"):
                        out.append((time.perf_counter() - t0) * 1000)
    return out


def ttft_direct(model: str, n: int, max_tokens: int) -> list[float]:
    from core.config import Settings
    from models.spec import ModelSpec
    from workers.engine import GenParams, GenRequest
    from workers.engines.swift import SwiftEngine

    settings = Settings(max_batch_size=8, served_model_name="tiny")
    engine = SwiftEngine(
        ModelSpec(path=__import__("pathlib").Path(model), model_type="qwen2", template="qwen2_5", demo=True),
        settings,
    )

    class FirstDelta:
        def __init__(self) -> None:
            self.t: float | None = None

        def on_delta(self, i: int, text: str) -> None:
            if text and self.t is None:
                self.t = time.perf_counter()

        def on_reset(self, i: int) -> None: ...

        def flush(self) -> None: ...

        def should_stop(self, i: int) -> bool:
            return False

        def wants_tokens(self, i: int) -> bool:
            return True

        def any_stop(self) -> bool:
            return False

    out = []
    engine.generate([GenRequest([{"role": "user", "content": "warm"}], GenParams(max_tokens=4))])
    for i in range(n):
        sink = FirstDelta()
        t0 = time.perf_counter()
        engine.generate(
            [GenRequest([{"role": "user", "content": f"ttft {i}"}], GenParams(max_tokens=max_tokens))], sink
        )
        out.append(((sink.t or time.perf_counter()) - t0) * 1000)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=20)
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=64)
    args = ap.parse_args()
    with stack() as (base, model, _, _sup):
        lat = delivery_latencies(base, args.streams, args.max_tokens)
        queue = ttft_queue(base, args.requests, args.max_tokens)
        direct = ttft_direct(str(model), args.requests, args.max_tokens)
    report = {
        "delivery_ms": {"events": len(lat), "p50": _pct(lat, 0.5), "p99": _pct(lat, 0.99)},
        "ttft_ms": {
            "queue_p50": statistics.median(queue),
            "direct_p50": statistics.median(direct),
            "overhead_p50": statistics.median(queue) - statistics.median(direct),
        },
    }
    print(json.dumps(report, indent=2))
    print(
        f"delivery XADD->SSE: p50 {report['delivery_ms']['p50']:.1f} ms, "
        f"p99 {report['delivery_ms']['p99']:.1f} ms "
        f"over {len(lat)} token events from {args.streams} concurrent streams"
    )
    print(
        f"TTFT: queue path p50 {statistics.median(queue):.1f} ms vs engine direct p50 "
        f"{statistics.median(direct):.1f}"
        f" ms -> queue overhead {report['ttft_ms']['overhead_p50']:.1f} ms"
    )


if __name__ == "__main__":
    main()
