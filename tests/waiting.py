"""The suite's one way to wait for something that cannot be awaited: a bounded poll with a clear failure.

Every wait in the tests goes through `wait_until` (threads, subprocesses, HTTP) or `until` (async tests, whose
event loop must keep running the code under test meanwhile). Both are bounded in time and in tries, and fail
naming what they waited for and the last thing they saw, so a timeout in CI says what did not happen.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")

INTERVAL_S = 0.05


def _tries(timeout: float, interval: float) -> int:
    # One more than the sleeps fit in the timeout: the last try comes at (or just past) the deadline.
    return max(1, math.ceil(timeout / interval)) + 1


def _failure(what: str, timeout: float, last: object, details: Callable[[], str] | None) -> TimeoutError:
    extra = f"\n{details()}" if details is not None else ""
    return TimeoutError(f"waited {timeout:g} s for {what}; last seen: {last!r}{extra}")


def wait_until(
    probe: Callable[[], T],
    timeout: float,
    what: str,
    interval: float = INTERVAL_S,
    *,
    details: Callable[[], str] | None = None,
) -> T:
    """Call `probe` until it returns something truthy and return that; after `timeout` seconds raise
    TimeoutError naming `what`, the probe's last result and `details()` (logs of the processes involved).

    An exception from `probe` (a process that exited) ends the wait at once: nothing will come.
    """
    deadline = time.monotonic() + timeout
    last: T | None = None
    for _ in range(_tries(timeout, interval)):
        last = probe()
        if last:
            return last
        if time.monotonic() >= deadline:
            break
        time.sleep(interval)  # the poll interval of a bounded loop, not a wait for an outcome
    raise _failure(what, timeout, last, details)


async def until(
    probe: Callable[[], T | Awaitable[T]],
    timeout: float,
    what: str,
    interval: float = INTERVAL_S,
) -> T:
    """`wait_until` for async tests: `probe` may be a coroutine function; the loop keeps running meanwhile."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    for _ in range(_tries(timeout, interval)):
        result = probe()
        last = await result if isinstance(result, Awaitable) else result
        if last:
            return last
        if time.monotonic() >= deadline:
            break
        await asyncio.sleep(interval)  # the poll interval of a bounded loop
    raise _failure(what, timeout, last, None)
