"""`python -m api.serve`: the API under uvicorn, with a calmer main loop.

Why not `uvicorn --factory api.main:create_app`: uvicorn's main loop wakes ten times a
second (to refresh its Date header once a second and to notice a stop), which was about a
fifth of the idle stack's CPU. Here it wakes once a second; a stop is seen within a second.
"""

from __future__ import annotations

import argparse
import asyncio

import uvicorn


class CalmServer(uvicorn.Server):
    async def main_loop(self) -> None:
        counter = 0
        should_exit = await self.on_tick(counter)
        while not should_exit:
            counter = (counter + 10) % 864000  # on_tick counts tenths of a second
            await asyncio.sleep(1.0)
            should_exit = await self.on_tick(counter)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m api.serve")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--log-level", default="info")
    args = ap.parse_args(argv)
    config = uvicorn.Config(
        "api.main:create_app",
        factory=True,
        host=args.host,
        port=args.port,
        access_log=False,
        timeout_graceful_shutdown=5,
        # longer than clients' pools keep idle connections: no reset on a reused connection
        timeout_keep_alive=75,
        log_level=args.log_level,
    )
    CalmServer(config).run()


if __name__ == "__main__":
    main()
