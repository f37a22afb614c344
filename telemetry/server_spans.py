"""The SERVER span of every HTTP request the bot serves, the root of a webhook's trace and parent of
`wabot.reply`: FastAPI's own OpenTelemetry support, given our tracer provider (FastAPI >= 0.165, as tested).

Chosen over opentelemetry-instrumentation-fastapi for cost: counted in instructions (`bench/instructions.py`), that
middleware took 1.36 M instructions per webhook with its span's export, FastAPI's own about 0.64 M (it does not
record OTel HTTP metrics this bot never exports, nor match each request against every route a second time). The span
follows the stable HTTP semantic conventions: `{method} {route}`, `http.response.status_code`, ERROR on a 5xx.

A caller's trace context (`traceparent`) is ignored: the span is always a new trace's root (drop_trace_context).

Only spans: FastAPI's HTTP metrics and logs stay off (metrics are Prometheus', logs are ours), and so does
everything when tracing is off, even if some library sets a global provider. Probes and pages are not traced.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

from fastapi.telemetry import TelemetryConfig

from telemetry.tracing import Tracing

# Probes and pages that would drown the traces of messages: health checks every few seconds, the status page's
# refresh, the demo chat page, its static files and its event stream (whose query string holds a phone number).
UNTRACED_PATHS = frozenset({"/", "/healthz", "/readyz", "/status", "/status.json", "/demo/events"})
UNTRACED_PREFIXES = ("/demo/static/",)
_OFF: TelemetryConfig = {"tracing": False, "metrics": False, "logs": False, "operation_spans": False}
_TRACE_CONTEXT_HEADERS = frozenset({b"traceparent", b"tracestate", b"baggage"})


def drop_trace_context(scope: MutableMapping[str, Any]) -> None:
    """Remove the W3C trace context headers a caller sent, before the server span reads them.

    Twilio never sends any; anyone else could pick the trace id of a webhook's trace, or with a sampled flag of 0
    switch its tracing off. Every webhook trace starts here."""
    headers = scope.get("headers") or []
    if any(name in _TRACE_CONTEXT_HEADERS for name, _ in headers):
        scope["headers"] = [(name, value) for name, value in headers if name not in _TRACE_CONTEXT_HEADERS]


def traced(path: str) -> bool:
    return path not in UNTRACED_PATHS and not path.startswith(UNTRACED_PREFIXES)


def _untraced(scope: MutableMapping[str, Any]) -> bool:
    return not traced(scope.get("path", ""))


def fastapi_telemetry(tracing: Tracing) -> TelemetryConfig:
    """The `telemetry=` of the app: server spans on our provider, nothing else."""
    if not tracing.enabled:
        return _OFF
    # Dependency, endpoint and serialization spans would be three more spans per webhook, each as costly as the
    # server span, saying nothing the run's own spans don't.
    return {**_OFF, "tracing": True, "tracer_provider": tracing.provider, "exclude": _untraced}
