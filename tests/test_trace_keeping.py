"""WABOT_TRACES_KEEP_OK: every trace of a message that went wrong is exported, a share of the others.

First the processor on its own, on spans made with the SDK; then a real bot with `WABOT_TRACES_KEEP_OK=0`, where an
answered message leaves no trace behind and a timed-out one leaves all of it, follow-up included.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, Status, StatusCode, TraceFlags

from bot.settings import DEFAULT_HOLDING_MESSAGE
from telemetry.trace_keeping import KeepWhatMatters
from telemetry.tracing import ActiveSpan
from tests.conftest import Bot
from tests.test_tracing import wait_for_spans


def keeping(keep_ok: float, **limits: int) -> tuple[trace.Tracer, InMemorySpanExporter, KeepWhatMatters]:
    exporter = InMemorySpanExporter()
    processor = KeepWhatMatters(SimpleSpanProcessor(exporter), keep_ok, **limits)
    provider = TracerProvider()
    provider.add_span_processor(processor)
    return provider.get_tracer("test"), exporter, processor


def names(exporter: InMemorySpanExporter) -> list[str]:
    return [span.name for span in exporter.get_finished_spans()]


def message(tracer: trace.Tracer, outcome: str = "ok", *, status: int = 200, fail_run: bool = False) -> None:
    """One webhook's trace as the bot makes it: server span, wabot.reply, invoke_agent (ended inside)."""
    with ActiveSpan(tracer, "POST /whatsapp", kind=SpanKind.SERVER) as server:
        with ActiveSpan(tracer, "wabot.reply") as reply:
            with ActiveSpan(tracer, "invoke_agent") as run:
                if fail_run:
                    run.set_status(Status(StatusCode.ERROR, "boom"))
            reply.set_attribute("wabot.reply.outcome", outcome)
        server.set_attribute("http.response.status_code", status)


def test_answered_messages_are_dropped_and_every_kind_of_trouble_is_kept() -> None:
    tracer, exporter, _ = keeping(0.0)
    message(tracer)
    assert names(exporter) == []
    for trouble in ({"outcome": "timeout"}, {"outcome": "error"}, {"outcome": "busy"}, {"fail_run": True}):
        exporter.clear()
        message(tracer, **trouble)
        assert names(exporter) == ["invoke_agent", "wabot.reply", "POST /whatsapp"], trouble
    exporter.clear()
    with ActiveSpan(tracer, "POST /whatsapp", kind=SpanKind.SERVER) as rejected:
        rejected.set_attribute("http.response.status_code", 403)
    assert names(exporter) == ["POST /whatsapp"]
    exporter.clear()
    # A run resumed after a restart joins its message's trace through the journaled traceparent.
    journaled = SpanContext(0x5B, 0x7C, is_remote=True, trace_flags=TraceFlags(TraceFlags.SAMPLED))
    with ActiveSpan(tracer, "POST /whatsapp", kind=SpanKind.SERVER):  # an answered webhook, for contrast
        pass
    with trace.use_span(NonRecordingSpan(journaled)), ActiveSpan(tracer, "invoke_agent"):
        tracer.start_span("chat sim-model").end()
    assert names(exporter) == ["chat sim-model", "invoke_agent"]


def test_spans_ending_after_the_root_follow_its_decision() -> None:
    tracer, exporter, _ = keeping(0.0)
    runs = []
    for outcome in ("timeout", "ok"):
        with ActiveSpan(tracer, "POST /whatsapp", kind=SpanKind.SERVER), ActiveSpan(tracer, "wabot.reply") as reply:
            reply.set_attribute("wabot.reply.outcome", outcome)
            runs.append(tracer.start_span(f"invoke_agent {outcome}"))  # outlives the webhook, as a timed-out run
    assert names(exporter) == ["wabot.reply", "POST /whatsapp"]
    timed_out, answered = runs
    timed_out.end()
    answered.end()
    assert names(exporter)[-1] == "invoke_agent timeout"
    assert "invoke_agent ok" not in names(exporter)
    # A late failure is exported even from a dropped trace: alone, it still says what failed.
    with ActiveSpan(tracer, "POST /whatsapp", kind=SpanKind.SERVER):
        late = tracer.start_span("twilio.messages.create")
    late.set_status(Status(StatusCode.ERROR))
    late.end()
    assert names(exporter)[-1] == "twilio.messages.create"


def test_the_share_of_answered_traces_kept_is_decided_by_trace_id() -> None:
    tracer, exporter, _ = keeping(0.25)
    for _ in range(400):
        message(tracer)
    roots = [span for span in exporter.get_finished_spans() if span.name == "POST /whatsapp"]
    assert 60 <= len(roots) <= 140  # 100 expected; binomial sd ~8.7
    assert all((span.context.trace_id & (2**64 - 1)) < 2**62 for span in roots)
    assert len(exporter.get_finished_spans()) == 3 * len(roots)  # whole traces, never parts


def test_traces_whose_root_never_ends_are_bounded_and_exported_when_evicted_or_at_shutdown() -> None:
    tracer, exporter, processor = keeping(0.0, max_pending=2)
    roots = [tracer.start_span(f"root {i}", kind=SpanKind.SERVER) for i in range(4)]
    for i, root in enumerate(roots):
        with trace.use_span(root):
            tracer.start_span(f"child {i}").end()
    assert names(exporter) == ["child 0", "child 1"]  # the two oldest, pushed out by the third and fourth
    processor.shutdown()
    assert names(exporter) == ["child 0", "child 1", "child 2", "child 3"]


def test_keep_ok_must_be_a_share() -> None:
    with pytest.raises(ValueError, match="between 0 and 1"):
        KeepWhatMatters(SimpleSpanProcessor(InMemorySpanExporter()), 1.5)


def test_a_bot_keeping_no_answered_trace_still_exports_every_timeout_trace(
    make_bot: Callable[..., Bot], sim, sink
) -> None:
    bot = make_bot(reply_timeout=0.5, traces_keep_ok=0.0)
    assert bot.send("quick one", sender="+15557654310").status == 200
    sender = "+15557654311"
    assert bot.send("slow one [sim:delay=1.5]", sender=sender).messages == [DEFAULT_HOLDING_MESSAGE]
    sink.wait_for_messages(1, to=f"whatsapp:{sender}", timeout=10)
    spans = wait_for_spans(
        bot, "POST /whatsapp", "wabot.reply", "invoke_agent", "twilio.messages.create", "twilio.typing_indicator.create"
    )
    # Only the timed-out message's trace, whole: the answered one left nothing behind.
    assert len({span.context.trace_id for span in spans}) == 1
    assert sorted(span.name for span in spans) == sorted(
        [
            "POST /whatsapp",
            "wabot.reply",
            "invoke_agent",
            "chat sim-model",
            "twilio.messages.create",
            "twilio.typing_indicator.create",
        ]
    )
    [reply] = [span for span in spans if span.name == "wabot.reply"]
    assert reply.attributes["wabot.reply.outcome"] == "timeout"
