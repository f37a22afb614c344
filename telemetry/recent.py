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
from dataclasses import dataclass
from typing import Any

from telemetry.metrics import MEDIA_OUTCOMES, SECONDS_BUCKETS, TYPING_OUTCOMES
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


@dataclass(frozen=True)
class _Attachment:
    at: float
    kind: str
    outcome: str
    transcribe_s: float | None


class RecentActivity:
    """Replies, follow-ups, attachments and typing indicators of the last `window_s` seconds. Thread-safe: the
    metrics port reads it."""

    def __init__(self, window_s: float | None = None, thresholds: Thresholds = THRESHOLDS) -> None:
        self.window_s = thresholds.status_window_s if window_s is None else window_s
        self.thresholds = thresholds
        self._lock = threading.Lock()
        # (at, outcome, total_s): plain tuples of a float, a str and a float, which the garbage collector stops
        # tracking at their first young collection, so the window's records (30,000 at 100 msg/s) are never walked
        # by a full pass; a dataclass instance was two tracked objects each.
        self._replies: deque[tuple[float, str, float]] = deque(maxlen=_MAX_EVENTS)
        self._followups: deque[tuple[float, str]] = deque(maxlen=_MAX_EVENTS)
        self._attachments: deque[_Attachment] = deque(maxlen=_MAX_EVENTS)
        # (at, outcome, seconds), plain tuples too: every message in flight sends one every refresh (20 s), so under an
        # incident (5,000 in flight) the window holds ~75,000 of them.
        self._indicators: deque[tuple[float, str, float | None]] = deque(maxlen=_MAX_EVENTS)

    def record_reply(self, outcome: str, total_s: float) -> None:
        with self._lock:
            self._replies.append((time.monotonic(), outcome, total_s))

    def record_followup(self, outcome: str) -> None:
        with self._lock:
            self._followups.append((time.monotonic(), outcome))

    def record_media(self, kind: str, outcome: str, transcribe_s: float | None = None) -> None:
        """One attachment and what became of it (the `media` log event's kind, outcome and transcribe_s)."""
        with self._lock:
            self._attachments.append(_Attachment(time.monotonic(), kind, outcome, transcribe_s))

    def record_typing(self, outcome: str, seconds: float | None = None) -> None:
        """One typing indicator call (refreshes included). `seconds`: arrival -> accepted, only for a message's first
        indicator Twilio accepted (what wabot_typing_indicator_seconds observes); None for refreshes and failures."""
        with self._lock:
            self._indicators.append((time.monotonic(), outcome, seconds))

    def _prune(self, now: float) -> None:
        horizon = now - self.window_s
        while self._replies and self._replies[0][0] < horizon:
            self._replies.popleft()
        while self._followups and self._followups[0][0] < horizon:
            self._followups.popleft()
        while self._attachments and self._attachments[0].at < horizon:
            self._attachments.popleft()
        while self._indicators and self._indicators[0][0] < horizon:
            self._indicators.popleft()

    def snapshot(self, *, deadline_s: float, pending_followups: int) -> dict[str, Any]:
        """Everything the status view shows, as plain JSON-ready data."""
        with self._lock:
            self._prune(time.monotonic())
            replies = list(self._replies)
            followups = [outcome for _, outcome in self._followups]
            attachments, indicators = list(self._attachments), list(self._indicators)
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
            "media": media_snapshot(attachments, self.thresholds),
            "typing": typing_snapshot(indicators, self.thresholds),
        }


def media_snapshot(attachments: list[_Attachment], thresholds: Thresholds) -> dict[str, Any]:
    """Attachments by outcome and kind, the failure share as WabotMediaFailing computes it (fetch and transcription
    errors among the attachments the bot should have read) with its line and gate, and transcription times."""
    m = thresholds.media
    outcomes = dict.fromkeys(MEDIA_OUTCOMES, 0)
    by_kind: dict[str, dict[str, int]] = {}
    for a in attachments:
        outcomes[a.outcome] = outcomes.get(a.outcome, 0) + 1
        kind = by_kind.setdefault(a.kind, {})
        kind[a.outcome] = kind.get(a.outcome, 0) + 1
    read = sum(outcomes.get(o, 0) for o in m.read_outcomes)
    failed = sum(outcomes.get(o, 0) for o in m.failure_outcomes)
    transcriptions = [a.transcribe_s for a in attachments if a.transcribe_s is not None]
    return {
        "attachments": len(attachments),
        "outcomes": outcomes,
        "by_kind": by_kind,
        "read": read,
        "failed": failed,
        "failure_ratio": failed / read if read else 0.0,
        "failure_ratio_alert_line": m.failure_ratio,
        "min_attachments": m.min_attachments,
        "transcriptions": len(transcriptions),
        "transcription_p50_s": percentile(transcriptions, 50),
        "transcription_p95_s": percentile(transcriptions, 95),
    }


def typing_snapshot(indicators: list[tuple[float, str, float | None]], thresholds: Thresholds) -> dict[str, Any]:
    """Typing indicators (at, outcome, seconds) by outcome, the failed share as WabotTypingIndicatorsFailing computes
    it, and arrival -> accepted of the messages' first indicators against the 1 s line."""
    m = thresholds.media
    outcomes = dict.fromkeys(TYPING_OUTCOMES, 0)
    for _, outcome, _ in indicators:
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    firsts = [seconds for _, _, seconds in indicators if seconds is not None]
    return {
        "indicators": len(indicators),
        "outcomes": outcomes,
        "failure_ratio": outcomes["failed"] / len(indicators) if indicators else 0.0,
        "failure_ratio_alert_line": m.typing_failure_ratio,
        "min_indicators": m.min_typing_indicators,
        "first_p50_s": percentile(firsts, 50),
        "first_p95_s": percentile(firsts, 95),
        "line_s": m.typing_line_s,
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
