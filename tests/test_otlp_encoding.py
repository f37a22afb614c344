"""telemetry/otlp_encoding.py writes exactly what opentelemetry-exporter-otlp's encoder writes, for spans of every
shape Hypothesis can make; the exporters built on it are the ones the bot uses.

Compared as canonical bytes: both requests decoded with opentelemetry-proto and serialized deterministically, so
field order does not matter and NaN attributes compare equal.
"""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.attributes import BoundedAttributes
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans as library_encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.util import BoundedList
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags, TraceState

from bot.settings import Settings
from telemetry.otlp_encoding import encode_spans
from telemetry.otlp_export import HttpExporter, grpc_exporter_class
from telemetry.tracing import _otlp_exporter

EXAMPLES = settings(max_examples=300, derandomize=True, database=None, deadline=None)

text = st.text(st.characters(exclude_categories=["Cs"]), max_size=12)  # no lone surrogates: not valid UTF-8
int64 = st.integers(-(2**63), 2**63 - 1)
floats = st.floats(allow_nan=True, allow_infinity=True)
scalar = st.one_of(text, st.booleans(), int64, floats)
value = st.one_of(
    scalar,
    st.lists(text, max_size=3).map(tuple),
    st.lists(st.booleans(), max_size=3).map(tuple),
    st.lists(int64, max_size=3).map(tuple),
    st.lists(floats, max_size=3).map(tuple),
)
attributes = st.dictionaries(st.text(min_size=1, max_size=10), value, max_size=6)
ids = st.tuples(st.integers(1, 2**128 - 1), st.integers(1, 2**64 - 1))
# The W3C key and value grammars the SDK accepts, drawn as text from their alphabets: st.from_regex would be the
# same strings at several times the cost (it was a third of this module's time).
LOWER, DIGITS = "abcdefghijklmnopqrstuvwxyz", "0123456789"
trace_state_keys = st.builds(str.__add__, st.sampled_from(LOWER), st.text(alphabet=LOWER + DIGITS + "_-*/", max_size=8))
trace_state_values = st.text(alphabet=LOWER + LOWER.upper() + DIGITS, min_size=1, max_size=8)
trace_states = st.dictionaries(trace_state_keys, trace_state_values, max_size=2).map(
    lambda d: TraceState(list(d.items()))
)


@st.composite
def contexts(draw: st.DrawFn, remote: bool | None = None) -> SpanContext:
    trace_id, span_id = draw(ids)
    is_remote = draw(st.booleans()) if remote is None else remote
    flags = TraceFlags(draw(st.sampled_from([0, 1])))
    return SpanContext(trace_id, span_id, is_remote, trace_flags=flags, trace_state=draw(trace_states))


@st.composite
def bounded(draw: st.DrawFn) -> BoundedAttributes:
    """Attributes past a limit are dropped and counted: the encoders must agree on the count too."""
    values = draw(attributes)
    return BoundedAttributes(maxlen=draw(st.integers(0, 6)), attributes=values, immutable=False)


resources = st.sampled_from(
    [
        Resource({"service.name": "wabot", "service.version": "1.0"}),
        Resource({"service.name": "other", "k8s.pod.uid": 7}, schema_url="https://opentelemetry.io/schemas/1.21.0"),
    ]
)
scopes = st.sampled_from(
    [
        None,
        InstrumentationScope("wabot", "0.1.0"),
        InstrumentationScope("wabot.sub", None, "https://opentelemetry.io/schemas/1.21.0"),
        InstrumentationScope("other", "2", attributes={"a": 1}),
    ]
)


@st.composite
def spans(draw: st.DrawFn) -> ReadableSpan:
    start = draw(st.integers(0, 2**63))
    events = [
        Event(draw(text), attributes=draw(bounded()), timestamp=draw(st.integers(0, 2**63)))
        for _ in range(draw(st.integers(0, 2)))
    ]
    links = [Link(draw(contexts()), attributes=draw(bounded())) for _ in range(draw(st.integers(0, 2)))]
    if draw(st.booleans()):
        # As a recording span hands them over: bounded, with what did not fit counted as dropped.
        events = BoundedList.from_seq(draw(st.integers(0, 2)), events)
        links = BoundedList.from_seq(draw(st.integers(0, 2)), links)
    code = draw(st.sampled_from(list(StatusCode)))
    description = draw(text) if code is StatusCode.ERROR else None
    return ReadableSpan(
        name=draw(text),
        context=draw(contexts(remote=False)),
        parent=draw(st.none() | contexts()),
        resource=draw(resources),
        attributes=draw(bounded()),
        events=events,
        links=links,
        kind=draw(st.sampled_from(list(SpanKind))),
        instrumentation_scope=draw(scopes),
        status=Status(code, description),
        start_time=start,
        end_time=draw(st.none() | st.integers(start, 2**64 - 1)),
    )


class PublicOnly(ReadableSpan):
    """A ReadableSpan of another SDK or a test double: only the public properties are guaranteed."""

    def __init__(self, span: ReadableSpan) -> None:  # no super().__init__(): none of the SDK's private fields
        self._wrapped = span

    def __getattribute__(self, name: str) -> object:
        if name.startswith("_") and name != "_wrapped" and not name.startswith("__"):
            raise AttributeError(name)
        return super().__getattribute__(name)

    def __getattr__(self, name: str) -> object:
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(object.__getattribute__(self, "_wrapped"), name)


for _name in (
    "name",
    "context",
    "kind",
    "parent",
    "start_time",
    "end_time",
    "status",
    "attributes",
    "events",
    "links",
    "resource",
    "dropped_attributes",
    "dropped_events",
    "dropped_links",
    "instrumentation_scope",
):
    setattr(PublicOnly, _name, property(lambda self, n=_name: getattr(object.__getattribute__(self, "_wrapped"), n)))


def canonical(request: ExportTraceServiceRequest) -> bytes:
    return request.SerializeToString(deterministic=True)


def ours(batch: list[ReadableSpan]) -> bytes:
    return canonical(ExportTraceServiceRequest.FromString(encode_spans(batch)))


@EXAMPLES
@given(st.lists(spans(), min_size=1, max_size=5))
def test_the_encoding_is_the_librarys_for_any_span(batch: list[ReadableSpan]) -> None:
    assert ours(batch) == canonical(library_encode_spans(batch))


@settings(max_examples=60, derandomize=True, database=None, deadline=None)
@given(st.lists(spans(), min_size=1, max_size=3))
def test_spans_read_through_their_public_properties_encode_the_same(batch: list[ReadableSpan]) -> None:
    # The encoder reads the SDK's own spans through their fields, where the properties would copy; anything
    # else must still encode exactly as the library does.
    assert ours([PublicOnly(span) for span in batch]) == canonical(library_encode_spans(batch))


def test_values_protobuf_cannot_hold_are_left_out_as_the_library_does() -> None:
    span = ReadableSpan(
        name="x",
        context=SpanContext(1, 2, False),
        resource=Resource({}),
        attributes={"too.big": 2**64, "fine": 1, "nan": math.nan, "neg": -1, "zero": -0.0},
        status=Status(StatusCode.UNSET),
        start_time=1,
        end_time=2,
    )
    assert ours([span]) == canonical(library_encode_spans([span]))
    [kept] = ExportTraceServiceRequest.FromString(encode_spans([span])).resource_spans[0].scope_spans[0].spans
    assert [kv.key for kv in kept.attributes] == ["fine", "nan", "neg", "zero"]
    assert math.copysign(1.0, kept.attributes[3].value.double_value) == -1.0  # -0.0 keeps its sign


def test_repeated_values_come_from_the_cache_and_still_encode_right() -> None:
    def span(i: int, value: object) -> ReadableSpan:
        return ReadableSpan(
            name="s",
            context=SpanContext(1, i + 1, False),
            resource=Resource({}),
            attributes={"k": value},
            status=Status(StatusCode.UNSET),
        )

    # True == 1 == 1.0 as dict keys: a cache keyed on the value alone would mix them up.
    batch = [span(i, v) for i, v in enumerate([True, 1, 1.0, "1", True, 1, 1.0, "1"])]
    assert ours(batch) == canonical(library_encode_spans(batch))


def test_the_bot_exports_with_the_lean_encoders() -> None:
    http = _otlp_exporter(Settings(_env_file=None, otel_exporter_otlp_endpoint="http://127.0.0.1:4318"))
    assert isinstance(http, HttpExporter)
    # The library still has everything the lean export relies on (otherwise it falls back to the library's own).
    assert http.lean
    grpc = _otlp_exporter(
        Settings(
            _env_file=None, otel_exporter_otlp_endpoint="http://127.0.0.1:4317", otel_exporter_otlp_protocol="grpc"
        )
    )
    assert isinstance(grpc, grpc_exporter_class())
    http.shutdown()
    grpc.shutdown()


def test_equal_resources_that_are_distinct_objects_make_one_group() -> None:
    def span(i: int) -> ReadableSpan:
        return ReadableSpan(
            name=f"s{i}",
            context=SpanContext(1, i + 1, False),
            resource=Resource({"service.name": "wabot"}),  # a new object each time, equal to the others
            instrumentation_scope=InstrumentationScope("wabot", "1"),
            status=Status(StatusCode.UNSET),
        )

    batch = [span(i) for i in range(3)]
    assert ours(batch) == canonical(library_encode_spans(batch))
    [group] = ExportTraceServiceRequest.FromString(encode_spans(batch)).resource_spans
    assert [s.name for s in group.scope_spans[0].spans] == ["s0", "s1", "s2"]
