"""A wall clock the tests drive: time passes only when a test says so, so nothing waits for the next minute."""

from __future__ import annotations

import threading


class DrivenClock:
    """Callable like `time.time`; starts `start` seconds after the epoch and moves only by `advance`.

    The default start lies well inside a minute (…:30), so a burst of messages never straddles a rate-limit
    window boundary by accident; a test crosses one by advancing the clock.
    """

    def __init__(self, start: float = 1_800_000_030.0) -> None:
        self._now = start
        self._lock = threading.Lock()  # read by the bot's event-loop thread, moved by the test's

    def __call__(self) -> float:
        with self._lock:
            return self._now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self._now += seconds
