"""Rejected requests under a flood: every one counted, at most a few logged and traced per second.

Anyone can post to the webhook. Without a bound, each unsigned request cost a warning line and an exported trace
(a rejection trace is always kept, telemetry/trace_keeping.py): a flood was amplified into the log pipeline and the
tracing backend. Now, per reason and per second, the first REJECTION_LOGS_PER_SECOND rejections are logged and
traced as before; the rest of that second are only counted (`wabot_webhook_rejections_total` stays exact). The next
line logged for that reason carries `suppressed`: how many were left out since the previous one. A rejection left
out of the logs is left out of the exported traces too, so every logged rejection still leads to its trace.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor
from opentelemetry.trace import SpanKind

REJECTION_LOGS_PER_SECOND = 10
# Set on the server span of a rejection left out of the logs; such spans are not exported.
SAMPLED_OUT = "wabot.rejection.sampled_out"


class RejectionThrottle:
    """Decides which rejections are logged and traced: the first few per reason in each second."""

    def __init__(
        self, per_second: int = REJECTION_LOGS_PER_SECOND, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._per_second = per_second
        self._clock = clock
        self._windows: dict[str, tuple[int, int]] = {}  # reason -> (second, rejections logged in it)
        self._suppressed: dict[str, int] = {}  # reason -> rejections left out since its last line

    def admit(self, reason: str) -> int | None:
        """None when this rejection is to be left out; otherwise how many of its reason were left out before it.

        A rejection left out marks the current (server) span so that it is not exported."""
        second = int(self._clock())
        window, logged = self._windows.get(reason, (second, 0))
        if window != second:
            logged = 0
        if logged >= self._per_second:
            self._suppressed[reason] = self._suppressed.get(reason, 0) + 1
            trace.get_current_span().set_attribute(SAMPLED_OUT, True)
            return None
        self._windows[reason] = (second, logged + 1)
        return self._suppressed.pop(reason, 0)


class DropSampledOut(SpanProcessor):
    """Hands every span to `exporting` except the server spans of rejections left out under a flood."""

    def __init__(self, exporting: SpanProcessor) -> None:
        self._exporting = exporting

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        self._exporting.on_start(span, parent_context)

    def on_end(self, span: ReadableSpan) -> None:
        # Only server spans can carry the mark; reading the attributes of every span would cost more.
        if span.kind is SpanKind.SERVER and (span.attributes or {}).get(SAMPLED_OUT):
            return
        self._exporting.on_end(span)

    def shutdown(self) -> None:
        self._exporting.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._exporting.force_flush(timeout_millis)
