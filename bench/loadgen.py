"""A lean HTTP/1.1 load generator for the benchmarks.

Why not httpx: on the 2-core machine the benchmarks were written on, httpx's async client
spent about 7 ms of CPU per POST, against about 2 ms in the API itself, so it measured
the client and starved the engine sharing the cores. This one writes pre-encoded
requests on keep-alive connections and reads each response by its Content-Length
(about 0.1 ms per request). It speaks only what our API answers to a JSON POST.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any
from urllib.parse import urlsplit


class HTTPError(RuntimeError):
    pass


def _request(host: str, path: str, body: dict[str, Any]) -> bytes:
    payload = json.dumps(body).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\n\r\n"
    )
    return head.encode() + payload


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value)
        elif name.strip().lower() == "transfer-encoding":
            raise HTTPError("chunked responses are not supported by this load generator")
    return status, await reader.readexactly(length)


async def post_many(
    base: str, path: str, bodies: list[dict[str, Any]], concurrency: int = 64
) -> tuple[list[dict[str, Any]], list[float]]:
    """POST every body (at most `concurrency` in flight, one connection each); returns the
    decoded responses and each request's latency in seconds, in input order."""
    url = urlsplit(base)
    host, port = url.hostname or "127.0.0.1", url.port or 80
    wire = [_request(f"{host}:{port}", path, b) for b in bodies]
    out: list[dict[str, Any]] = [{} for _ in bodies]
    lat = [0.0] * len(bodies)
    next_i = 0

    async def conn() -> None:
        nonlocal next_i
        reader, writer = await asyncio.open_connection(host, port)
        try:
            while next_i < len(wire):
                i = next_i
                next_i += 1
                t0 = time.perf_counter()
                writer.write(wire[i])
                status, data = await _read_response(reader)
                lat[i] = time.perf_counter() - t0
                if status >= 300:
                    raise HTTPError(f"POST {path} -> {status}: {data[:300]!r}")
                out[i] = json.loads(data)
        finally:
            writer.close()

    await asyncio.gather(*(conn() for _ in range(min(concurrency, len(bodies)))))
    return out, lat


async def paced(base: str, path: str, bodies: list[dict[str, Any]], rate: float, seconds: float) -> None:
    """POST `bodies` over and over at about `rate` requests/s, in 0.1 s ticks."""
    per_tick = max(1, round(rate / 10))
    end = time.monotonic() + seconds
    i = 0
    while time.monotonic() < end:
        tick = time.monotonic() + 0.1
        chunk = [bodies[(i + k) % len(bodies)] for k in range(per_tick)]
        i += per_tick
        await post_many(base, path, chunk, concurrency=min(16, per_tick))
        await asyncio.sleep(max(0.0, tick - time.monotonic()))


if __name__ == "__main__":  # background traffic for bench.efficiency.interference
    import sys

    from bench.common import prompts
    from bench.efficiency import _bodies

    base_url, rate_s, max_tokens = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
    asyncio.run(paced(base_url, "/v1/jobs", _bodies(prompts(256), max_tokens), rate_s, 3600))
