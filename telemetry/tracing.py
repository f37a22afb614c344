"""OpenTelemetry tracing: the provider set up from the standard OTEL_* settings, and the span names we own.

The AI run span is ours, not an instrumentation library's: under a deadline race the run outlives the request
that started it, and its span must end when the run really ends, with `error.type` set on failure
(the OpenAI SDK's own instrumentation would end it with the request).

OTEL_SDK_DISABLED=true (the OpenTelemetry standard switch) makes tracing a no-op: the tracer creates no spans,
`Tracing.enabled` is False so the app's server spans are off too (telemetry/server_spans.py), and trace ids in logs
are null. Metrics and logs are not affected.
"""

from __future__ import annotations

import contextvars
from dataclasses import dataclass
from types import TracebackType
from typing import Protocol

from opentelemetry import context, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    ParentBased,
    Sampler,
    TraceIdRatioBased,
)
from opentelemetry.util.types import Attributes

from telemetry.flood import DropSampledOut
from telemetry.otlp_export import HttpExporter, grpc_exporter_class
from telemetry.trace_keeping import KeepWhatMatters

TRACER_NAME = "wabot"


class TracingSettings(Protocol):
    """The settings tracing is built from (the standard OTEL_* variables and WABOT_TRACES_KEEP_OK); the bot's
    settings class has them all. Read-only properties, so any object with these attributes fits."""

    @property
    def otel_sdk_disabled(self) -> bool: ...
    @property
    def otel_service_name(self) -> str: ...
    @property
    def otel_traces_exporter(self) -> str: ...
    @property
    def otel_exporter_otlp_endpoint(self) -> str | None: ...
    @property
    def otel_exporter_otlp_traces_endpoint(self) -> str | None: ...
    @property
    def otel_exporter_otlp_protocol(self) -> str: ...
    @property
    def otel_traces_sampler(self) -> str: ...
    @property
    def otel_traces_sampler_arg(self) -> float | None: ...
    @property
    def traces_keep_ok(self) -> float: ...


@dataclass
class Tracing:
    """A tracer provider of our own (not the global one, so several apps can live in one test process)."""

    provider: trace.TracerProvider
    tracer: trace.Tracer
    enabled: bool = True

    def shutdown(self) -> None:
        """Flush pending spans and stop the exporters."""
        if isinstance(self.provider, TracerProvider):
            self.provider.force_flush(timeout_millis=5000)
            self.provider.shutdown()


def _sampler(name: str, arg: float | None) -> Sampler:
    ratio = 1.0 if arg is None else arg
    samplers: dict[str, Sampler] = {
        "always_on": ALWAYS_ON,
        "always_off": ALWAYS_OFF,
        "traceidratio": TraceIdRatioBased(ratio),
        "parentbased_always_on": ParentBased(ALWAYS_ON),
        "parentbased_always_off": ParentBased(ALWAYS_OFF),
        "parentbased_traceidratio": ParentBased(TraceIdRatioBased(ratio)),
    }
    if name not in samplers:
        raise ValueError(f"OTEL_TRACES_SAMPLER={name!r} is not one of {', '.join(samplers)}")
    return samplers[name]


def _otlp_exporter(settings: TracingSettings) -> SpanExporter:
    protocol = settings.otel_exporter_otlp_protocol
    endpoint = settings.otel_exporter_otlp_traces_endpoint
    base = settings.otel_exporter_otlp_endpoint
    if protocol == "grpc":
        # No `insecure=`: the exporter decides from the scheme (http:// is plaintext) and, for a bare host:port,
        # from OTEL_EXPORTER_OTLP_[TRACES_]INSECURE, which an explicit False would override.
        return grpc_exporter_class()(endpoint=endpoint or base)
    if protocol in ("http/protobuf", "http"):
        if not endpoint and base:
            endpoint = base.rstrip("/") + "/v1/traces"
        return HttpExporter(endpoint=endpoint)
    raise ValueError(f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol!r} is not grpc or http/protobuf")


def setup_tracing(settings: TracingSettings, exporter: SpanExporter | None = None, *, version: str) -> Tracing:
    """Build the provider: OTLP (HTTP or gRPC) by default, `none` to disable, or a given exporter (tests).
    `version` is the service's (`service.version`, and the tracer's).

    Without an OTLP endpoint configured nothing is exported, so a laptop run does not retry a collector that
    is not there. With OTEL_SDK_DISABLED=true there is no SDK at all: a no-op provider, `enabled` False.
    """
    if settings.otel_sdk_disabled:
        noop = trace.NoOpTracerProvider()
        return Tracing(provider=noop, tracer=noop.get_tracer(TRACER_NAME, version), enabled=False)
    resource = Resource.create({"service.name": settings.otel_service_name, "service.version": version})
    provider = TracerProvider(
        resource=resource, sampler=_sampler(settings.otel_traces_sampler, settings.otel_traces_sampler_arg)
    )
    processor: SpanProcessor | None = None
    if exporter is not None:
        processor = SimpleSpanProcessor(exporter)
    elif settings.otel_traces_exporter == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        processor = BatchSpanProcessor(ConsoleSpanExporter())
    elif settings.otel_traces_exporter == "otlp" and (
        settings.otel_exporter_otlp_endpoint or settings.otel_exporter_otlp_traces_endpoint
    ):
        processor = BatchSpanProcessor(_otlp_exporter(settings))
    elif settings.otel_traces_exporter not in ("none", "otlp"):
        raise ValueError(f"OTEL_TRACES_EXPORTER={settings.otel_traces_exporter!r} is not otlp, console or none")
    if processor is not None and settings.traces_keep_ok < 1.0:
        processor = KeepWhatMatters(processor, settings.traces_keep_ok)
    if processor is not None:
        # Outermost: a rejection left out under a flood is not exported, kept or not (telemetry/flood.py).
        provider.add_span_processor(DropSampledOut(processor))
    return Tracing(provider=provider, tracer=provider.get_tracer(TRACER_NAME, version))


class ActiveSpan:
    """`with ActiveSpan(tracer, name, kind=..., attributes=...) as span:` starts a span, makes it the current span
    for the block and ends it when the block ends, however it ends.

    What `Tracer.start_as_current_span` does, without its two generator-based context managers, and with the
    attributes given at the start (cheaper per span: docs/benchmarks.md). Unlike it, an exception leaving the
    block is not recorded on the span unless `record_exception` is set, and then with its type only, no text: the
    bot's spans say what failed themselves (`record_error`), in the GenAI conventions' terms.
    """

    __slots__ = ("_record_exception", "_span", "_token")

    def __init__(
        self,
        tracer: trace.Tracer,
        name: str,
        *,
        kind: trace.SpanKind = trace.SpanKind.INTERNAL,
        attributes: Attributes = None,
        record_exception: bool = False,
    ) -> None:
        self._span = tracer.start_span(
            name, kind=kind, attributes=attributes, record_exception=False, set_status_on_exception=False
        )
        self._record_exception = record_exception

    def __enter__(self) -> trace.Span:
        self._token = context.attach(trace.set_span_in_context(self._span))
        return self._span

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        span = self._span
        try:
            context.detach(self._token)
            # As start_as_current_span: Exceptions only; a cancellation is not the span's failure.
            if self._record_exception and isinstance(exc, Exception) and span.is_recording():
                # The type only: an exception's text can quote the user, the model or a vendor (record_error).
                span.add_event("exception", {"exception.type": type(exc).__name__})
                span.set_status(trace.Status(trace.StatusCode.ERROR, type(exc).__name__))
        finally:
            span.end()


def detached_context(parent: trace.SpanContext | None = None) -> contextvars.Context:
    """The context to start a task in that outlives the request starting it (a run, its typing indicator).

    Its spans are children of the current span and its log lines carry that span's ids, as in a copy of the current
    context; but it holds none of the request's objects. A copy would hold the current span itself (`wabot.reply`,
    ended when the webhook returns: its attributes, events, locks), the server span and FastAPI's request state in
    OpenTelemetry's context, for as long as the task waits on the model: ~30 objects per waiting run that every
    full collection walks (docs/benchmarks.md). Here the current span is replaced by its context alone (ids, flags,
    state, remote or not: all a child span, a log line and an exemplar read of it), and no other variable is set.
    `parent`: that span context, taken earlier (a timer's task), instead of the current span's.
    """
    if parent is None:
        parent = trace.get_current_span().get_span_context()
    detached = contextvars.Context()
    detached.run(context.attach, trace.set_span_in_context(trace.NonRecordingSpan(parent), context.Context()))
    return detached


def record_error(span: trace.Span, error_type: str) -> None:
    """Mark a span failed the GenAI-conventions way: status ERROR and `error.type`.

    The type is all a span says of an error (with a vendor's error code as its own attribute): an error's text can
    quote the user's message, a tool's arguments or a vendor's message about the recipient, and spans leave the
    process for a tracing backend that is not meant to hold any of that."""
    span.set_attribute("error.type", error_type)
    span.set_status(trace.Status(trace.StatusCode.ERROR, error_type))
