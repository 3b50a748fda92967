"""The tests' one way to wait for something: poll it until it is true, or fail saying what
was seen last. (`cli.processes.wait_for` is the product's: ports at start-up.)"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def eventually(
    condition: Callable[[], T | None],
    timeout: float = 30,
    interval: float = 0.05,
    message: str | Callable[[], object] = "condition not met",
) -> T:
    """Call `condition` every `interval` seconds until it returns something truthy; return that.

    An exception other than AssertionError counts as "not yet" (a server still starting). An
    AssertionError raised by `condition` fails at once: assert inside it what must hold while
    waiting (the process under test is still alive, the job has not failed). On timeout:
    AssertionError with `message` (a callable is called then, to show the state at the end),
    the last value and the last exception.
    """
    deadline = time.monotonic() + timeout
    last: object = None
    error: Exception | None = None
    while True:
        try:
            value = condition()
        except AssertionError:
            raise
        except Exception as exc:
            error = exc
        else:
            if value:
                return value
            last, error = value, None
        left = deadline - time.monotonic()
        if left <= 0:
            break
        time.sleep(min(interval, left))
    try:
        text = message() if callable(message) else message
    except Exception as exc:  # the state could not be read: say so, keep the timeout
        text = f"{message!r} raised {exc!r}"
    detail = f"last raised {error!r}" if error is not None else f"last value {last!r}"
    raise AssertionError(f"{text} (not within {timeout:g} s; {detail})") from error


async def eventually_async(
    condition: Callable[[], object], timeout: float = 30, message: str = "condition"
) -> None:
    """`eventually` for a test whose code under test runs on the test's own event loop (a
    blocking sleep would stop it): `condition` may return an awaitable."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return
        assert time.monotonic() < deadline, f"{message} (not within {timeout:g} s; last value {value!r})"
        await asyncio.sleep(0.02)
