"""Which finished traces leave the process: every trace of a message that went wrong, a share of the rest.

Head sampling (`OTEL_TRACES_SAMPLER=parentbased_traceidratio`) decides when a trace starts, so it drops timeout and
error traces as often as the others: the operator paged at 3 a.m. finds one timeout trace in ten. This decides
when the trace's local root ends (the webhook's server span, or the first span of a run resumed after a restart),
from everything its spans say by then:

- kept: any span in ERROR, a `wabot.reply.outcome` other than `ok` (timeout, error, busy), an HTTP status of 400 or
  more (a rejected webhook; under a flood only the first few a second reach here, telemetry/flood.py), a run
  resumed after a restart;
- otherwise kept with probability `keep_ok` (WABOT_TRACES_KEEP_OK), decided from the trace id as the ratio sampler
  does, so every process keeps the same traces.

Spans that end before the root wait for it (a run answered inline ends before its webhook); spans that end after
follow the decision (a timed-out run's spans, its follow-up). Every span is still recorded, so logs carry trace
ids and metrics their exemplars; what is saved is the export, a part of tracing's cost (docs/benchmarks.md).
Memory is bounded: at most `max_pending` traces wait for their root (past that the oldest is exported as is, since
a root that never ends is itself a sign of trouble) and `max_decided` decisions are remembered. With
WABOT_TRACES_KEEP_OK=1 (the default) this processor is not installed at all.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

from opentelemetry.context import Context
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor
from opentelemetry.sdk.trace.sampling import TraceIdRatioBased
from opentelemetry.trace import SpanKind, StatusCode


def _local_root(span: ReadableSpan) -> bool:
    parent = span.parent
    return parent is None or parent.is_remote


def _resumed(span: ReadableSpan) -> bool:
    # A run resumed after a restart continues its message's trace from the journaled traceparent: a local root
    # with a remote parent that is not a server span. Its webhook's part was a timeout (it was kept); the rest of
    # it is kept too, or the trace would arrive without its end.
    return span.parent is not None and span.kind is not SpanKind.SERVER


def _went_wrong(span: ReadableSpan) -> bool:
    if span.status.status_code is StatusCode.ERROR:
        return True
    # Only two kinds of span say more: the race (its outcome) and the server span (its status code). Their
    # attributes are read only there, as reading them costs more than everything else here.
    if span.name == "wabot.reply":
        outcome = (span.attributes or {}).get("wabot.reply.outcome")
        return outcome is not None and outcome != "ok"
    if span.kind is SpanKind.SERVER:
        status_code = (span.attributes or {}).get("http.response.status_code")
        return isinstance(status_code, int) and status_code >= 400
    return False


class KeepWhatMatters(SpanProcessor):
    """Wraps the processor that exports (the batch processor) and hands it only the traces to keep."""

    def __init__(
        self, exporting: SpanProcessor, keep_ok: float, *, max_pending: int = 4096, max_decided: int = 16384
    ) -> None:
        if not 0.0 <= keep_ok <= 1.0:
            raise ValueError(f"keep_ok={keep_ok} is not between 0 and 1")
        self._exporting = exporting
        # The ratio sampler's own rule, so a trace kept here is one it would have kept at the same rate.
        self._bound = TraceIdRatioBased.get_bound_for_rate(keep_ok)
        self._max_pending = max_pending
        self._max_decided = max_decided
        self._pending: OrderedDict[int, list[ReadableSpan]] = OrderedDict()
        self._decided: OrderedDict[int, bool] = OrderedDict()
        self._lock = threading.Lock()

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        self._exporting.on_start(span, parent_context)

    def on_end(self, span: ReadableSpan) -> None:
        trace_id = span.context.trace_id
        with self._lock:
            to_export = self._route(trace_id, span)
        for finished in to_export:
            self._exporting.on_end(finished)

    def _route(self, trace_id: int, span: ReadableSpan) -> list[ReadableSpan]:
        decided = self._decided.get(trace_id)
        if decided is not None and not _local_root(span):
            # A late span that failed is exported even from a dropped trace: on its own it still says what failed.
            return [span] if decided or _went_wrong(span) else []
        waiting = self._pending.pop(trace_id, [])
        waiting.append(span)
        if not _local_root(span):
            self._pending[trace_id] = waiting
            return self._overflow()
        keep = (
            _resumed(span)
            or any(_went_wrong(s) for s in waiting)
            or (trace_id & TraceIdRatioBased.TRACE_ID_LIMIT) < self._bound
        )
        self._decided[trace_id] = keep
        self._decided.move_to_end(trace_id)
        while len(self._decided) > self._max_decided:
            self._decided.popitem(last=False)
        return waiting if keep else []

    def _overflow(self) -> list[ReadableSpan]:
        if len(self._pending) <= self._max_pending:
            return []
        _, oldest = self._pending.popitem(last=False)
        return oldest

    def shutdown(self) -> None:
        with self._lock:
            waiting = [span for spans in self._pending.values() for span in spans]
            self._pending.clear()
        for span in waiting:  # traces whose root never ended: kept, as in _overflow
            self._exporting.on_end(span)
        self._exporting.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._exporting.force_flush(timeout_millis)
