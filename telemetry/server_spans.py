"""The SERVER span of every HTTP request the bot serves: the root of a webhook's trace, parent of `wabot.reply`.

Ours rather than opentelemetry-instrumentation-fastapi's middleware, for cost: counted in instructions
(`bench/instructions.py`), that middleware took 1.36 M instructions per webhook including its span's export
(about 10 % of everything the bot does for a message), this one 0.64 M. The library also records four OTel HTTP
metrics per request, which this bot never exports (its metrics are Prometheus'), matches the request against
every route a second time to name the span, and collects its attributes twice. What the span says is the same:
the stable HTTP semantic conventions, named `{method} {route}`, status ERROR on a 5xx or an exception, the
caller's W3C trace context (`traceparent`) as parent. Query strings are never recorded: the demo chat page
carries phone numbers in them.
"""

from __future__ import annotations

from typing import Any

from opentelemetry import context, propagate, trace
from opentelemetry.propagators.textmap import Getter
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# Probes and pages that would drown the traces of messages: health checks every few seconds, the status page's
# refresh, the demo chat page and its static files and event stream.
UNTRACED_PATHS = frozenset({"/", "/healthz", "/readyz", "/status", "/status.json", "/demo/events"})
UNTRACED_PREFIXES = ("/demo/static/",)


class _ScopeHeaders(Getter[Scope]):
    """Read request headers out of an ASGI scope for the propagator (header names arrive lower-cased)."""

    def get(self, carrier: Scope, key: str) -> list[str] | None:
        name = key.lower().encode("latin-1")
        values = [value.decode("latin-1") for header, value in carrier["headers"] if header == name]
        return values or None

    def keys(self, carrier: Scope) -> list[str]:
        return [header.decode("latin-1") for header, _ in carrier["headers"]]


_HEADERS = _ScopeHeaders()


def traced(path: str) -> bool:
    return path not in UNTRACED_PATHS and not path.startswith(UNTRACED_PREFIXES)


class ServerSpans:
    """ASGI middleware: one SERVER span per traced HTTP request, current while the app handles it."""

    def __init__(self, app: ASGIApp, tracer: trace.Tracer) -> None:
        self.app = app
        self.tracer = tracer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not traced(scope["path"]):
            await self.app(scope, receive, send)
            return
        method = scope["method"]
        parent = propagate.extract(scope, getter=_HEADERS)
        span = self.tracer.start_span(
            method, context=parent, kind=trace.SpanKind.SERVER, attributes=_request_attributes(scope)
        )
        # No response start seen means the app raised and Starlette's error middleware, outside this one, sends a 500.
        status = 500

        async def send_and_note_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        error_type: str | None = None
        token = context.attach(trace.set_span_in_context(span, parent))
        try:
            await self.app(scope, receive, send_and_note_status)
        except Exception as exc:
            span.record_exception(exc)
            error_type = type(exc).__qualname__
            raise
        finally:
            context.detach(token)
            _end(span, scope, method, status, error_type)


def _request_attributes(scope: Scope) -> dict[str, Any]:
    attributes: dict[str, Any] = {
        "http.request.method": scope["method"],
        "url.scheme": scope.get("scheme", "http"),
        "url.path": scope["path"],
        "network.protocol.version": scope.get("http_version", "1.1"),
    }
    server = scope.get("server")
    if server:
        attributes["server.address"], attributes["server.port"] = server[0], server[1]
    client = scope.get("client")
    if client:
        attributes["client.address"] = client[0]
    for header, value in scope["headers"]:
        if header == b"user-agent":
            attributes["user_agent.original"] = value.decode("latin-1")
            break
    return attributes


def _end(span: trace.Span, scope: Scope, method: str, status: int, error_type: str | None) -> None:
    route = scope.get("route")
    path = getattr(route, "path", None)
    if path:
        # Named after the route template, not the path: bounded cardinality for trace search.
        span.update_name(f"{method} {path}")
        span.set_attribute("http.route", path)
    span.set_attribute("http.response.status_code", status)
    if status >= 500 or error_type:
        span.set_attribute("error.type", error_type or str(status))
        span.set_status(trace.StatusCode.ERROR)
    span.end()
