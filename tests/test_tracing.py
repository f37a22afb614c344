"""Traces: one trace per inbound message, with the AI run span ending when the run really ends.

Span trees are read from each bot's in-memory exporter; OTLP export is checked end to end against receivers on
127.0.0.1 (HTTP/protobuf and gRPC) that decode what the bot sends with opentelemetry-proto.
"""

from __future__ import annotations

import asyncio
import gc
import gzip
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import grpc
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from opentelemetry import trace
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace import Span as SdkSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from bot import __version__
from bot.settings import DEFAULT_APOLOGY_MESSAGE, DEFAULT_HOLDING_MESSAGE, Settings
from telemetry.privacy import UserHasher
from telemetry.server_spans import fastapi_telemetry
from telemetry.tracing import ActiveSpan, Tracing, setup_tracing
from tests.conftest import AUTH_TOKEN, Bot, free_port, metric
from tests.waiting import wait_until

TOOL_MESSAGE = 'what is 6*7 [sim:tool=calculate:{"expression":"6*7"}]'
TOOL_ANSWER = 'Tool calculate said: {"expression": "6*7", "result": 42}'


def wait_for_spans(bot: Bot, *names: str, timeout: float = 10.0) -> list[ReadableSpan]:
    """Bounded poll of the exporter until a span of every given name (repeats count) has ended."""

    def ended() -> list[ReadableSpan]:
        spans = list(bot.spans.get_finished_spans())
        names_ended = [span.name for span in spans]
        return spans if all(names_ended.count(name) >= names.count(name) for name in names) else []

    ended_names = lambda: str(sorted(span.name for span in bot.spans.get_finished_spans()))  # noqa: E731
    return wait_until(ended, timeout, f"spans {sorted(names)} to end", 0.02, details=ended_names)


def only(spans: Sequence[ReadableSpan], name: str) -> ReadableSpan:
    [span] = [s for s in spans if s.name == name]
    return span


def in_trace(spans: Sequence[ReadableSpan], trace_id: int) -> list[ReadableSpan]:
    return [s for s in spans if s.context.trace_id == trace_id]


def parent_id(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


def seconds(start_ns: int | None, end_ns: int | None) -> float:
    assert start_ns is not None and end_ns is not None
    return (end_ns - start_ns) / 1e9


def assert_no_phone_number(spans: Sequence[ReadableSpan], number: str) -> None:
    """No span name, attribute, event or resource value carries the number, in any of its spellings."""
    forms = (number, number.lstrip("+"), f"whatsapp:{number}")
    for span in spans:
        texts = [span.name, *(f"{k}={v}" for k, v in (span.attributes or {}).items())]
        texts += [f"{k}={v}" for k, v in span.resource.attributes.items()]
        for event in span.events:
            texts += [event.name, *(f"{k}={v}" for k, v in (event.attributes or {}).items())]
        for text in texts:
            assert not any(form in text for form in forms), f"phone number in span {span.name!r}: {text!r}"


def test_ok_run_is_one_trace_from_webhook_to_tool(make_bot: Callable[..., Bot], sim, sink) -> None:
    bot = make_bot(reply_timeout=3.0)
    sender = "+15557654301"
    posted = bot.send(TOOL_MESSAGE, sender=sender)
    assert posted.messages == [TOOL_ANSWER]
    spans = wait_for_spans(bot, "POST /whatsapp", "wabot.reply", "invoke_agent", "chat sim-model", "chat sim-model")

    server = only(spans, "POST /whatsapp")
    trace_spans = in_trace(spans, server.context.trace_id)
    reply = only(trace_spans, "wabot.reply")
    agent = only(trace_spans, "invoke_agent")
    chats = sorted((s for s in trace_spans if s.name == "chat sim-model"), key=lambda s: s.start_time or 0)
    tool = only(trace_spans, "execute_tool calculate")
    assert len(chats) == 2

    assert server.kind == SpanKind.SERVER
    assert server.parent is None
    assert server.attributes["http.route"] == "/whatsapp"
    assert server.attributes["http.response.status_code"] == 200

    assert reply.kind == SpanKind.INTERNAL
    assert parent_id(reply) == server.context.span_id
    assert reply.status.status_code == StatusCode.UNSET
    assert dict(reply.attributes) == {
        "wabot.reply.timeout_s": 3.0,
        "wabot.user.hash": UserHasher(AUTH_TOKEN)(f"whatsapp:{sender}"),
        "wabot.reply.outcome": "ok",
        "wabot.reply.elapsed_s": reply.attributes["wabot.reply.elapsed_s"],
        "wabot.reply.parts": 1,
    }
    assert 0 < reply.attributes["wabot.reply.elapsed_s"] < 3.0
    assert len(reply.attributes["wabot.user.hash"]) == 16

    # The run answered inline: its span ends inside the webhook's.
    assert parent_id(agent) == reply.context.span_id
    assert agent.end_time <= reply.end_time <= server.end_time
    assert agent.status.status_code == StatusCode.UNSET
    calls = sim.calls()
    assert [c["id"] for c in calls] == [c.attributes["gen_ai.response.id"] for c in chats]
    chat_in = [c.attributes["gen_ai.usage.input_tokens"] for c in chats]
    chat_out = [c.attributes["gen_ai.usage.output_tokens"] for c in chats]
    assert min(chat_in + chat_out) > 0
    assert dict(agent.attributes) == {
        "gen_ai.operation.name": "invoke_agent",
        "gen_ai.provider.name": "openai",
        "gen_ai.agent.name": "wabot",
        "gen_ai.request.model": "sim-model",
        "gen_ai.response.model": "sim-model",
        "gen_ai.response.id": calls[-1]["id"],
        "gen_ai.usage.input_tokens": sum(chat_in),
        "gen_ai.usage.output_tokens": sum(chat_out),
        "wabot.agent.tool_count": 1,
    }

    for chat in chats:
        assert chat.kind == SpanKind.CLIENT
        assert parent_id(chat) == agent.context.span_id
        assert chat.status.status_code == StatusCode.UNSET
        assert chat.attributes["gen_ai.operation.name"] == "chat"
        assert chat.attributes["gen_ai.provider.name"] == "openai"
        assert chat.attributes["gen_ai.request.model"] == "sim-model"
        assert chat.attributes["gen_ai.response.model"] == "sim-model"

    # The tool runs between the call that asked for it and the call that got its output.
    assert tool.kind == SpanKind.INTERNAL
    assert parent_id(tool) == agent.context.span_id
    assert chats[0].end_time <= tool.start_time <= tool.end_time <= chats[1].start_time
    assert tool.status.status_code == StatusCode.UNSET
    assert tool.attributes["gen_ai.operation.name"] == "execute_tool"
    assert tool.attributes["gen_ai.tool.name"] == "calculate"
    assert str(tool.attributes["gen_ai.tool.call.id"]).startswith("call_")

    assert sink.messages() == []  # answered inline: no REST send, no client span
    assert not [s for s in spans if s.name == "twilio.messages.create"]
    assert_no_phone_number(spans, sender)


def test_timed_out_run_keeps_its_span_open_until_the_followup(make_bot: Callable[..., Bot], sim, sink) -> None:
    bot = make_bot(reply_timeout=0.5)
    sender = "+15557654302"
    posted = bot.send("slow one [sim:delay=1.5]", sender=sender)
    assert posted.messages == [DEFAULT_HOLDING_MESSAGE]
    [followup] = sink.wait_for_messages(1, to=f"whatsapp:{sender}", timeout=10)
    assert followup["body"] == "[turn 1] slow one"
    spans = wait_for_spans(bot, "POST /whatsapp", "wabot.reply", "invoke_agent", "twilio.messages.create")

    reply = only(spans, "wabot.reply")
    trace_spans = in_trace(spans, reply.context.trace_id)
    server = only(trace_spans, "POST /whatsapp")
    agent = only(trace_spans, "invoke_agent")
    send = only(trace_spans, "twilio.messages.create")

    assert reply.attributes["wabot.reply.outcome"] == "timeout"
    assert reply.attributes["wabot.reply.timeout_s"] == 0.5
    assert reply.attributes["wabot.reply.parts"] == 1
    assert 0.5 <= reply.attributes["wabot.reply.elapsed_s"] < 0.9
    assert 0.45 <= seconds(reply.start_time, reply.end_time) < 0.9
    assert server.end_time <= agent.end_time

    # The run outlived the webhook by the rest of the model's 1.5 s and still ended as a success.
    assert parent_id(agent) == reply.context.span_id
    assert seconds(reply.end_time, agent.end_time) >= 0.5
    assert seconds(agent.start_time, agent.end_time) >= 1.5
    assert agent.status.status_code == StatusCode.UNSET
    assert "error.type" not in agent.attributes
    assert agent.attributes["gen_ai.response.id"] == sim.calls()[0]["id"]
    assert agent.attributes["gen_ai.usage.output_tokens"] > 0

    # The follow-up is a client span of the same trace, after the answer.
    assert send.kind == SpanKind.CLIENT
    assert parent_id(send) == reply.context.span_id
    assert send.start_time >= agent.end_time
    assert send.status.status_code == StatusCode.UNSET
    assert dict(send.attributes) == {
        "http.request.method": "POST",
        "server.address": bot.settings.twilio_api_url.removeprefix("http://"),
        "wabot.message.length": len(followup["body"]),
        "wabot.delivery.attempts": 1,
        "twilio.message.sid": followup["sid"],
    }
    assert_no_phone_number(spans, sender)


def test_a_run_waiting_on_the_model_keeps_none_of_its_webhooks_spans(make_bot: Callable[..., Bot], sim, sink) -> None:
    """After the holding reply the run keeps only the ids of the span it belongs to, not the webhook's ended
    `wabot.reply` (a dozen objects every full collection walks, times the runs in flight in an incident:
    docs/benchmarks.md); its own spans still have that parent (the test above)."""
    bot = make_bot(reply_timeout=0.5)
    sender = "+15557654309"
    assert bot.send("waiting [sim:delay=8]", sender=sender).messages == [DEFAULT_HOLDING_MESSAGE]
    # This message's trace only: runs of other tests' bots in this process may still be waiting too.
    [ours] = {s.context.trace_id for s in bot.spans.get_finished_spans() if s.name == "wabot.reply"}
    gc.collect()
    live = [o for o in gc.get_objects() if isinstance(o, SdkSpan) and o.context.trace_id == ours]
    assert any(s.name == "invoke_agent" and s.is_recording() for s in live), "the run should still be waiting"
    assert [s for s in live if s.name == "wabot.reply"] == []
    del live
    [followup] = sink.wait_for_messages(1, to=f"whatsapp:{sender}", timeout=20)
    assert followup["body"] == "[turn 1] waiting"


def test_model_error_ends_the_run_span_in_error(make_bot: Callable[..., Bot], sim) -> None:
    # The SDK retries a 500 twice (about 1.5 s of backoff): the deadline leaves room for that.
    bot = make_bot(reply_timeout=4.0)
    sender = "+15557654303"
    assert bot.send("hello [sim:error=500]", sender=sender).messages == [DEFAULT_APOLOGY_MESSAGE]
    spans = wait_for_spans(bot, "POST /whatsapp", "wabot.reply", "invoke_agent", "chat sim-model")

    reply = only(spans, "wabot.reply")
    agent = only(spans, "invoke_agent")
    chat = only(spans, "chat sim-model")
    assert reply.attributes["wabot.reply.outcome"] == "error"
    assert reply.attributes["wabot.reply.parts"] == 1
    assert parent_id(agent) == reply.context.span_id
    assert agent.status.status_code == StatusCode.ERROR
    assert agent.attributes["error.type"] == "server_error"
    assert agent.attributes["gen_ai.usage.input_tokens"] == 0
    assert agent.attributes["gen_ai.usage.output_tokens"] == 0
    assert "gen_ai.response.id" not in agent.attributes
    assert parent_id(chat) == agent.context.span_id
    assert chat.status.status_code == StatusCode.ERROR
    assert chat.attributes["error.type"] == "server_error"
    assert [c["status"] for c in sim.calls()] == [500, 500, 500]
    assert_no_phone_number(spans, sender)


def test_run_past_the_followup_budget_ends_with_error_type_timeout(make_bot: Callable[..., Bot], sim, sink) -> None:
    bot = make_bot(reply_timeout=0.5, followup_timeout=1.5)
    sender = "+15557654304"
    started = time.monotonic()
    assert bot.send("hello [sim:hang]", sender=sender).messages == [DEFAULT_HOLDING_MESSAGE]
    [apology] = sink.wait_for_messages(1, to=f"whatsapp:{sender}", timeout=10)
    assert apology["body"] == DEFAULT_APOLOGY_MESSAGE
    spans = wait_for_spans(bot, "wabot.reply", "invoke_agent", "chat sim-model", "twilio.messages.create")

    reply = only(spans, "wabot.reply")
    agent = only(spans, "invoke_agent")
    chat = only(spans, "chat sim-model")
    send = only(spans, "twilio.messages.create")
    assert reply.attributes["wabot.reply.outcome"] == "timeout"
    assert agent.status.status_code == StatusCode.ERROR
    assert agent.attributes["error.type"] == "timeout"
    assert agent.status.description == "timeout"
    # The budget counts from arrival: the span ends ~1.5 s after the message came in, not 1.5 s after the deadline.
    assert 1.4 <= seconds(reply.start_time, agent.end_time) < 2.0
    assert time.monotonic() - started >= 1.5
    assert chat.status.status_code == StatusCode.ERROR
    assert chat.attributes["error.type"] == "timeout"
    assert send.context.trace_id == reply.context.trace_id
    assert send.start_time >= agent.end_time
    assert send.attributes["wabot.message.length"] == len(DEFAULT_APOLOGY_MESSAGE)
    assert_no_phone_number(spans, sender)


def test_run_cancelled_by_shutdown_still_ends_its_spans(make_bot: Callable[..., Bot], sim, sink) -> None:
    bot = make_bot(reply_timeout=0.5, followup_timeout=60.0)
    sender = "+15557654305"
    assert bot.send("hello [sim:hang]", sender=sender).messages == [DEFAULT_HOLDING_MESSAGE]
    sim.wait_for_calls(1, timeout=5)
    assert [s.name for s in bot.spans.get_finished_spans() if s.name == "invoke_agent"] == []
    model_timeouts = metric("wabot_model_calls_total", {"outcome": "timeout"})
    bot.stop()

    spans = list(bot.spans.get_finished_spans())
    agent = only(spans, "invoke_agent")
    chat = only(spans, "chat sim-model")
    assert agent.status.status_code == StatusCode.ERROR
    assert agent.attributes["error.type"] == "cancelled"
    # The model call did not time out: a deploy must not look like a slow model.
    assert chat.end_time is not None
    assert chat.status.status_code == StatusCode.ERROR
    assert chat.attributes["error.type"] == "cancelled"
    assert metric("wabot_model_calls_total", {"outcome": "timeout"}) == model_timeouts
    assert sink.messages(to=f"whatsapp:{sender}") == []
    assert_no_phone_number(spans, sender)


# ---------------------------------------------------------------- OTLP export


class OtlpHttpReceiver:
    """An OTLP/HTTP trace receiver on 127.0.0.1: keeps every request it decodes."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, trace_service_pb2.ExportTraceServiceRequest]] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                decoded = trace_service_pb2.ExportTraceServiceRequest.FromString(body)
                with receiver.lock:
                    receiver.requests.append((self.path, self.headers.get("Content-Type", ""), decoded))
                reply = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, name="otlp-http", daemon=True)
        self.thread.start()

    def exports(self) -> list[trace_service_pb2.ExportTraceServiceRequest]:
        with self.lock:
            return [request for _, _, request in self.requests]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def otlp_http() -> Iterator[OtlpHttpReceiver]:
    receiver = OtlpHttpReceiver()
    yield receiver
    receiver.close()


class _TraceService(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self.requests: list[trace_service_pb2.ExportTraceServiceRequest] = []

    def Export(self, request: Any, context: Any) -> trace_service_pb2.ExportTraceServiceResponse:
        self.requests.append(request)
        return trace_service_pb2.ExportTraceServiceResponse()


def flatten(requests: Sequence[trace_service_pb2.ExportTraceServiceRequest]) -> list[dict[str, Any]]:
    """Every exported span as {name, trace_id, span_id, parent, kind, attrs, resource, scope}."""
    out = []
    for request in requests:
        for resource_spans in request.resource_spans:
            resource = {kv.key: kv.value.string_value for kv in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    attrs = {}
                    for kv in span.attributes:
                        value = kv.value
                        attrs[kv.key] = getattr(value, value.WhichOneof("value"))
                    out.append(
                        {
                            "name": span.name,
                            "trace_id": span.trace_id.hex(),
                            "span_id": span.span_id.hex(),
                            "parent": span.parent_span_id.hex(),
                            "status": span.status.code,
                            "attrs": attrs,
                            "resource": resource,
                            "scope": scope_spans.scope.name,
                        }
                    )
    return out


def assert_exported_message_trace(spans: list[dict[str, Any]]) -> None:
    by_name = {span["name"]: span for span in spans}
    assert {"POST /whatsapp", "wabot.reply", "invoke_agent", "chat sim-model"} <= set(by_name)
    reply, agent, chat = by_name["wabot.reply"], by_name["invoke_agent"], by_name["chat sim-model"]
    assert reply["trace_id"] == agent["trace_id"] == chat["trace_id"] == by_name["POST /whatsapp"]["trace_id"]
    assert reply["parent"] == by_name["POST /whatsapp"]["span_id"]
    assert agent["parent"] == reply["span_id"]
    assert chat["parent"] == agent["span_id"]
    assert reply["attrs"]["wabot.reply.outcome"] == "ok"
    assert agent["attrs"]["gen_ai.provider.name"] == "openai"
    assert agent["attrs"]["gen_ai.usage.output_tokens"] > 0
    for span in spans:
        assert span["resource"]["service.name"] == "wabot"
        assert span["resource"]["service.version"] == "0.1.0"
    assert {reply["scope"], agent["scope"], chat["scope"]} == {"wabot"}
    for span in spans:
        assert all("5557654" not in f"{k}={v}" for k, v in span["attrs"].items())


def test_otlp_http_export_is_flushed_on_shutdown(make_bot: Callable[..., Bot], sim, otlp_http) -> None:
    bot = make_bot(
        reply_timeout=3.0,
        memory_spans=False,
        otel_traces_exporter="otlp",
        otel_exporter_otlp_endpoint=otlp_http.url,
        otel_exporter_otlp_protocol="http/protobuf",
    )
    assert bot.send("hello otlp", sender="+15557654306").messages == ["[turn 1] hello otlp"]
    bot.stop()  # the batch processor's schedule (5 s) has not come: only the shutdown flush sends them

    assert otlp_http.requests
    assert {(path, ctype) for path, ctype, _ in otlp_http.requests} == {("/v1/traces", "application/x-protobuf")}
    assert_exported_message_trace(flatten(otlp_http.exports()))


@pytest.mark.parametrize("scheme", ["http://", ""])
def test_otlp_grpc_export(make_bot: Callable[..., Bot], sim, monkeypatch, scheme: str) -> None:
    """An http:// endpoint is plaintext; so is a bare host:port when OTEL_EXPORTER_OTLP_INSECURE=true says so."""
    if not scheme:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_INSECURE", "true")
    service = _TraceService()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(service, server)
    port = server.add_insecure_port(f"127.0.0.1:{free_port()}")
    server.start()
    try:
        bot = make_bot(
            reply_timeout=3.0,
            memory_spans=False,
            otel_traces_exporter="otlp",
            otel_exporter_otlp_endpoint=f"{scheme}127.0.0.1:{port}",
            otel_exporter_otlp_protocol="grpc",
        )
        assert bot.send("hello grpc", sender="+15557654307").messages == ["[turn 1] hello grpc"]
        bot.stop()
    finally:
        server.stop(grace=None)
    assert_exported_message_trace(flatten(service.requests))


def test_traces_exporter_none_exports_nothing(make_bot: Callable[..., Bot], sim, otlp_http) -> None:
    bot = make_bot(
        reply_timeout=3.0,
        memory_spans=False,
        otel_traces_exporter="none",
        otel_exporter_otlp_endpoint=otlp_http.url,
        otel_exporter_otlp_protocol="http/protobuf",
    )
    assert bot.send("hello nobody", sender="+15557654308").messages == ["[turn 1] hello nobody"]
    bot.stop()
    assert otlp_http.requests == []


# ---------------------------------------------------------------------------------------------- the server span


def test_server_span_ignores_the_callers_trace_and_follows_http_conventions(make_bot: Callable[..., Bot], sim) -> None:
    """A caller's W3C `traceparent` is ignored: Twilio never sends one, and anyone else must not pick the trace."""
    bot = make_bot(reply_timeout=3.0)
    caller_trace, caller_span = 0x4BF92F3577B34DA6A3CE929D0E0E4736, 0x00F067AA0BA902B7
    traceparent = f"00-{caller_trace:032x}-{caller_span:016x}-01"
    posted = bot.post_form(bot.form("hi there", sender="+15557654310"), headers={"traceparent": traceparent})
    assert posted.messages == ["[turn 1] hi there"]
    spans = wait_for_spans(bot, "POST /whatsapp", "wabot.reply")
    server = only(spans, "POST /whatsapp")
    assert server.context.trace_id != caller_trace and server.parent is None
    assert parent_id(only(spans, "wabot.reply")) == server.context.span_id
    port = int(bot.url.rsplit(":", 1)[1])
    assert dict(server.attributes) == {
        "http.request.method": "POST",
        "url.scheme": "http",
        "url.path": "/whatsapp",
        "network.protocol.version": "1.1",
        "server.address": "127.0.0.1",
        "server.port": port,
        "http.route": "/whatsapp",
        "http.response.status_code": 200,
    }
    assert server.status.status_code == StatusCode.UNSET


def test_rejected_webhook_is_traced_without_error_and_probes_are_not_traced(make_bot: Callable[..., Bot]) -> None:
    bot = make_bot()
    assert bot.post_form(bot.form("forged"), signature="bm90IGEgc2lnbmF0dXJl").status == 403
    for probe in ("/healthz", "/readyz"):
        assert bot.client.get(f"{bot.url}{probe}").status_code == 200
    [server] = wait_for_spans(bot, "POST /whatsapp")
    assert server.attributes["http.response.status_code"] == 403
    # 4xx is the caller's error, not the server's: the span status stays unset (HTTP semantic conventions).
    assert server.status.status_code == StatusCode.UNSET
    assert [s.name for s in bot.spans.get_finished_spans()] == ["POST /whatsapp"]


def test_an_exception_in_the_app_ends_the_server_span_in_error() -> None:
    """The app's telemetry settings on their own, around an endpoint that fails: the span records the 500."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    app = FastAPI(telemetry=fastapi_telemetry(Tracing(provider=provider, tracer=provider.get_tracer("test"))))

    @app.post("/items/{item}")
    async def broken(item: int) -> None:
        raise RuntimeError("boom")

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    with TestClient(app, raise_server_exceptions=False) as client:
        assert client.post("/items/7").status_code == 500
        assert client.get("/healthz").status_code == 200
    [span] = exporter.get_finished_spans()  # and none for the probe
    assert span.name == "POST /items/{item}" and span.kind == SpanKind.SERVER
    assert span.status.status_code == StatusCode.ERROR
    assert span.attributes["http.response.status_code"] == 500
    assert span.attributes["url.path"] == "/items/7"
    assert span.attributes["error.type"] in ("500", "RuntimeError")


def test_with_tracing_off_the_app_makes_no_spans_even_with_a_global_provider(monkeypatch) -> None:
    """OTEL_SDK_DISABLED=true means no server spans, even when some library has set a global tracer provider
    (FastAPI would otherwise trace on it by default)."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(trace, "get_tracer_provider", lambda: provider)
    tracing = setup_tracing(Settings(_env_file=None, otel_sdk_disabled=True), version=__version__)
    app = FastAPI(telemetry=fastapi_telemetry(tracing))

    @app.get("/ping")
    async def ping() -> dict[str, str]:
        return {"pong": "yes"}

    with TestClient(app) as client:
        assert client.get("/ping").status_code == 200
    assert exporter.get_finished_spans() == ()


def _provider() -> tuple[trace.Tracer, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider.get_tracer("test"), exporter


def test_active_span_is_current_in_its_block_and_ends_with_it() -> None:
    tracer, exporter = _provider()
    before = trace.get_current_span()
    with ActiveSpan(tracer, "outer", attributes={"a": 1}) as outer:
        assert trace.get_current_span() is outer
        with ActiveSpan(tracer, "inner", kind=SpanKind.CLIENT) as inner:
            assert trace.get_current_span() is inner
        assert trace.get_current_span() is outer
    assert trace.get_current_span() is before
    inner_span, outer_span = exporter.get_finished_spans()
    assert (inner_span.name, outer_span.name) == ("inner", "outer")
    assert inner_span.kind is SpanKind.CLIENT and inner_span.parent.span_id == outer_span.context.span_id
    assert outer_span.attributes == {"a": 1}
    assert outer_span.status.status_code is StatusCode.UNSET


def test_active_span_records_an_escaping_exception_only_when_asked_and_never_a_cancellation() -> None:
    tracer, exporter = _provider()
    before = trace.get_current_span()
    for record, error in ((True, ValueError("boom")), (False, ValueError("quiet")), (True, asyncio.CancelledError())):
        with pytest.raises(type(error)), ActiveSpan(tracer, f"s-{record}-{error!r}", record_exception=record):
            raise error
        assert trace.get_current_span() is before  # the context is restored however the block ends
    loud, quiet, cancelled = exporter.get_finished_spans()
    assert loud.status.status_code is StatusCode.ERROR and loud.status.description == "ValueError"
    assert [event.name for event in loud.events] == ["exception"]
    assert quiet.status.status_code is StatusCode.UNSET and not quiet.events
    assert cancelled.status.status_code is StatusCode.UNSET and not cancelled.events
