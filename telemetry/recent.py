"""The last five minutes of this process, in memory: what `/status` and `wabot status` show without Prometheus.

Exact over the window (every reply is kept until it ages out, bounded in count), unlike histogram quantiles. The
window, the timeout-ratio line and the total-time lines are the alerts' (telemetry/thresholds.py), and the
snapshot carries them, so the views draw the same lines the alerts fire on.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections import deque
from typing import Any

from telemetry.metrics import SECONDS_BUCKETS
from telemetry.thresholds import THRESHOLDS, Thresholds, seconds_name

WINDOW_S = THRESHOLDS.status_window_s
KNOWN_OUTCOMES = ("ok", "timeout", "error")
# Outcomes whose user got a holding reply at once and the answer as a follow-up ("busy": every model slot taken).
HOLDING_OUTCOMES = ("timeout", "busy")
_MAX_EVENTS = 200_000  # bounds memory under a flood: ~10 MB at most


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (q in 0..100) of unsorted values; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


class RecentActivity:
    """Replies and follow-ups of the last `window_s` seconds. Thread-safe: the metrics port reads it."""

    def __init__(self, window_s: float | None = None, thresholds: Thresholds = THRESHOLDS) -> None:
        self.window_s = thresholds.status_window_s if window_s is None else window_s
        self.thresholds = thresholds
        self._lock = threading.Lock()
        # (at, outcome, total_s): plain tuples of a float, a str and a float, which the garbage collector stops
        # tracking at their first young collection, so the window's records (30,000 at 100 msg/s) are never walked
        # by a full pass; a dataclass instance was two tracked objects each.
        self._replies: deque[tuple[float, str, float]] = deque(maxlen=_MAX_EVENTS)
        self._followups: deque[tuple[float, str]] = deque(maxlen=_MAX_EVENTS)

    def record_reply(self, outcome: str, total_s: float) -> None:
        with self._lock:
            self._replies.append((time.monotonic(), outcome, total_s))

    def record_followup(self, outcome: str) -> None:
        with self._lock:
            self._followups.append((time.monotonic(), outcome))

    def _prune(self, now: float) -> None:
        horizon = now - self.window_s
        while self._replies and self._replies[0][0] < horizon:
            self._replies.popleft()
        while self._followups and self._followups[0][0] < horizon:
            self._followups.popleft()

    def snapshot(self, *, deadline_s: float, pending_followups: int) -> dict[str, Any]:
        """Everything the status view shows, as plain JSON-ready data."""
        with self._lock:
            self._prune(time.monotonic())
            replies = list(self._replies)
            followups = [outcome for _, outcome in self._followups]
        totals = [total for _, _, total in replies]
        # Counted generically: an outcome added to the webhook later still shows up under `outcomes`.
        outcomes = dict.fromkeys(KNOWN_OUTCOMES, 0)
        for _, outcome, _ in replies:
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
        holding = sum(outcomes.get(o, 0) for o in HOLDING_OUTCOMES)
        slow, limit = self.thresholds.total_time.slow_s, self.thresholds.total_time.twilio_limit_s
        return {
            "window_s": self.window_s,
            "messages": len(replies),
            "outcomes": outcomes,
            "answered_inline": outcomes["ok"],
            "holding_then_followup": holding,
            "errors": outcomes["error"],
            # The same ratio as the WabotAITimeoutRatioHigh rule (wabot:ai_timeout:ratio_rate5m): timeouts only.
            "timeout_ratio": outcomes["timeout"] / len(replies) if replies else 0.0,
            "timeout_ratio_alert_line": self.thresholds.alerts.timeout_ratio,
            "total_time_p50_s": percentile(totals, 50),
            "total_time_p95_s": percentile(totals, 95),
            "total_time_p99_s": percentile(totals, 99),
            # The lines and the replies past them, keys named after the lines (over_12s, over_15s).
            "slow_line_s": slow,
            "twilio_limit_s": limit,
            over_key(slow): sum(1 for t in totals if t > slow),
            over_key(limit): sum(1 for t in totals if t > limit),
            "followups_delivered": followups.count("delivered"),
            "followups_failed": followups.count("failed"),
            "followups_pending": pending_followups,
            "deadline_s": deadline_s,
            "histogram": histogram(totals),
        }


def over_key(seconds: float) -> str:
    """The snapshot's key counting replies slower than `seconds`: "over_12s"."""
    return f"over_{seconds_name(seconds)}"


def histogram(values: list[float]) -> list[dict[str, Any]]:
    """Counts per bucket of the metrics' SECONDS_BUCKETS (not cumulative); the last bucket's `le` is "+Inf"
    because JSON has no infinity."""
    counts = [0] * (len(SECONDS_BUCKETS) + 1)
    for value in values:
        counts[bisect.bisect_left(SECONDS_BUCKETS, value)] += 1
    edges: list[float | str] = [*SECONDS_BUCKETS, "+Inf"]
    return [{"le": edge, "count": count} for edge, count in zip(edges, counts, strict=True)]
