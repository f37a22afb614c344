"""The last five minutes of this process, in memory: what `/status` and `wabot status` show without Prometheus.

Exact over the window (every reply is kept until it ages out, bounded in count), unlike histogram quantiles.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from telemetry.metrics import SECONDS_BUCKETS

WINDOW_S = 300.0
_MAX_EVENTS = 200_000  # bounds memory under a flood: ~10 MB at most


@dataclass(frozen=True)
class _Reply:
    at: float
    outcome: str
    total_s: float


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

    def __init__(self, window_s: float = WINDOW_S) -> None:
        self.window_s = window_s
        self._lock = threading.Lock()
        self._replies: deque[_Reply] = deque(maxlen=_MAX_EVENTS)
        self._followups: deque[tuple[float, str]] = deque(maxlen=_MAX_EVENTS)

    def record_reply(self, outcome: str, total_s: float) -> None:
        with self._lock:
            self._replies.append(_Reply(time.monotonic(), outcome, total_s))

    def record_followup(self, outcome: str) -> None:
        with self._lock:
            self._followups.append((time.monotonic(), outcome))

    def _prune(self, now: float) -> None:
        horizon = now - self.window_s
        while self._replies and self._replies[0].at < horizon:
            self._replies.popleft()
        while self._followups and self._followups[0][0] < horizon:
            self._followups.popleft()

    def snapshot(self, *, deadline_s: float, pending_followups: int) -> dict[str, Any]:
        """Everything the status view shows, as plain JSON-ready data."""
        with self._lock:
            self._prune(time.monotonic())
            replies = list(self._replies)
            followups = [outcome for _, outcome in self._followups]
        totals = [r.total_s for r in replies]
        by_outcome = {o: sum(1 for r in replies if r.outcome == o) for o in ("ok", "timeout", "error")}
        edges = [*SECONDS_BUCKETS, float("inf")]
        histogram = [
            {"le": edge, "count": sum(1 for t in totals if (edges[i - 1] if i else 0.0) < t <= edge)}
            for i, edge in enumerate(edges)
        ]
        return {
            "window_s": self.window_s,
            "messages": len(replies),
            "answered_inline": by_outcome["ok"],
            "holding_then_followup": by_outcome["timeout"],
            "errors": by_outcome["error"],
            "timeout_ratio": by_outcome["timeout"] / len(replies) if replies else 0.0,
            "timeout_ratio_alert_line": 0.2,
            "total_time_p50_s": percentile(totals, 50),
            "total_time_p95_s": percentile(totals, 95),
            "total_time_p99_s": percentile(totals, 99),
            "over_12s": sum(1 for t in totals if t > 12),
            "over_15s": sum(1 for t in totals if t > 15),
            "followups_delivered": followups.count("delivered"),
            "followups_failed": followups.count("failed"),
            "followups_pending": pending_followups,
            "deadline_s": deadline_s,
            "histogram": histogram,
        }
