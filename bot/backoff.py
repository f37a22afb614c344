"""The one backoff rule of every retry loop that talks to Twilio, and the one reader of Retry-After.

Waits grow exponentially from a base up to a cap; when the server said how long to wait (Retry-After) and that is
longer, it is honoured, up to a limit of its own: past that the answer is late anyway. Two loops use it, each with
its own numbers: the attempts of one REST call (`bot/outbound.py`) and the rounds of attempts of a follow-up
(`bot/followup.py`).
"""

from __future__ import annotations

import email.utils
import time
from dataclasses import dataclass

# Past this many doublings every delay is at its cap already; the bound keeps the power a small float.
_MAX_DOUBLINGS = 60


@dataclass(frozen=True)
class Backoff:
    """How long to wait after a failed try: `base_s` after the first, doubling each time, never more than `cap_s`.

    A Retry-After longer than that is waited for instead, but never more than `retry_after_cap_s` (by default
    `cap_s`: the server's ask cannot stretch the wait past the cap).
    """

    base_s: float
    cap_s: float
    retry_after_cap_s: float | None = None

    def delay(self, failures: int, retry_after: float | None = None) -> float:
        """Seconds to wait after `failures` failed tries in a row (1 for the first)."""
        delay = min(self.base_s * 2.0 ** min(max(failures - 1, 0), _MAX_DOUBLINGS), self.cap_s)
        if retry_after is not None and retry_after > delay:
            limit = self.cap_s if self.retry_after_cap_s is None else self.retry_after_cap_s
            delay = max(delay, min(retry_after, limit))
        return delay


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds from a Retry-After header (delay-seconds or an HTTP date; `now`, a time.time() stamp, for the
    date's distance, the current time by default); None when absent or unreadable, 0 for a time passed."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        # "nan" and "inf" parse as floats; neither is a delay a server can mean.
        return max(seconds, 0.0) if seconds < float("inf") else None
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    return max(when.timestamp() - (time.time() if now is None else now), 0.0)
