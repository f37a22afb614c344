"""Finished spans to the bytes of an OTLP `ExportTraceServiceRequest`, written straight in protobuf's wire format.

The exporters of opentelemetry-exporter-otlp build a protobuf object per span, attribute and value and then
serialize it: about 290 k instructions per span of this bot (counted under callgrind; 0.35 M with the export's
HTTP share in `bench/instructions.py`), more than recording the span. Writing the same bytes directly takes about
63 k: the SDK's spans are read through their fields, not the properties that copy them, and the common case (a
string attribute, a one-byte length) is written without a call per field. The output is the library's own
encoding, field for field: tests decode both with opentelemetry-proto and compare them over generated spans of every
shape (all attribute types, events, links, status, remote parents, trace state, dropped counts, spans read through
their public properties only), so any divergence fails the suite before it reaches a collector. `bot`'s exporters
(telemetry/otlp_export.py) use it for OTLP over HTTP and gRPC alike.

Wire format reference: https://protobuf.dev/programming-guides/encoding/ and opentelemetry-proto's trace.proto.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Mapping, Sequence
from typing import Any

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import SpanKind

_log = logging.getLogger(__name__)

# Field keys, (field number << 3) | wire type: 0 varint, 1 fixed64, 2 length-delimited, 5 fixed32.
_KIND = {
    SpanKind.INTERNAL: b"\x30\x01",
    SpanKind.SERVER: b"\x30\x02",
    SpanKind.CLIENT: b"\x30\x03",
    SpanKind.PRODUCER: b"\x30\x04",
    SpanKind.CONSUMER: b"\x30\x05",
}
_FLAGS_HAS_IS_REMOTE = 0x100
_FLAGS_IS_REMOTE = 0x200
_INT64 = range(-(2**63), 2**63)
_fixed64 = struct.Struct("<Q").pack
_double = struct.Struct("<d").pack
_fixed32 = struct.Struct("<I").pack

# Encoded attributes of repeated (key, value) pairs: most attribute values of this bot's spans are the same from
# one span to the next (operation names, model, route). Bounded; cleared when full.
_CACHE_LIMIT = 4096
_key_value_cache: dict[tuple[bytes, str, type, Any], bytes] = {}
_CACHEABLE = frozenset({str, bool, int})
_names: dict[str, bytes] = {}  # attribute keys, encoded as a KeyValue's first field


_ONE_BYTE = [bytes((n,)) for n in range(0x80)]


def _varint(value: int) -> bytes:
    if value < 0x80:
        return _ONE_BYTE[value]
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _field(key: bytes, payload: bytes) -> bytes:
    """A length-delimited field: key, length, payload."""
    size = len(payload)
    return key + (_ONE_BYTE[size] if size < 0x80 else _varint(size)) + payload


def _text(key: bytes, text: str) -> bytes:
    return _field(key, text.encode("utf-8"))


def _any_value(value: Any) -> bytes:
    """An AnyValue message; the order of the checks is the library's (bool before int, str before sequence)."""
    if value is None:
        return b""
    if isinstance(value, bool):
        return b"\x10\x01" if value else b"\x10\x00"
    if isinstance(value, str):
        return _text(b"\x0a", value)
    if isinstance(value, int):
        if value not in _INT64:
            raise ValueError(f"{value} does not fit an int64")
        return b"\x18" + _varint(value & 0xFFFFFFFFFFFFFFFF)
    if isinstance(value, float):
        return b"\x21" + _double(value)
    if isinstance(value, bytes):
        return _field(b"\x3a", value)
    if isinstance(value, Sequence):
        return _field(b"\x2a", b"".join(_field(b"\x0a", _any_value(item)) for item in value))
    if isinstance(value, Mapping):
        pairs = b"".join(_field(b"\x0a", _key_value(str(k), v)) for k, v in value.items())
        return _field(b"\x32", pairs)
    raise TypeError(f"invalid type {type(value)} of value {value!r}")


def _key_value(key: str, value: Any) -> bytes:
    name = _names.get(key)
    if name is None:
        name = _text(b"\x0a", key)
        if len(_names) < _CACHE_LIMIT:
            _names[key] = name
    if type(value) is str:  # most values; the same bytes as _any_value's, with two calls fewer
        encoded = value.encode("utf-8")
        size = len(encoded)
        if size < 0x7E:  # the AnyValue (tag, length, text) stays under 128 bytes: one-byte lengths
            return name + b"\x12" + _ONE_BYTE[size + 2] + b"\x0a" + _ONE_BYTE[size] + encoded
    return name + _field(b"\x12", _any_value(value))


def _attributes(key: bytes, attributes: Mapping[str, Any] | None) -> bytes:
    """Every attribute as a repeated KeyValue field `key`; one that cannot be encoded is logged and left out."""
    if not attributes:
        return b""
    out = []
    for name, value in attributes.items():
        kind = type(value)
        cacheable = kind in _CACHEABLE
        if cacheable:
            hit = _key_value_cache.get((key, name, kind, value))
            if hit is not None:
                out.append(hit)
                continue
        try:
            encoded = key + _field(b"", _key_value(name, value))
        except (TypeError, ValueError) as exc:
            _log.error("Failed to encode key %s: %s", name, exc)
            continue
        if cacheable:
            if len(_key_value_cache) >= _CACHE_LIMIT:
                _key_value_cache.clear()
            _key_value_cache[(key, name, kind, value)] = encoded
        out.append(encoded)
    return b"".join(out)


def _plain(attributes: Any) -> Any:
    # The SDK's BoundedAttributes is a MutableMapping: iterating its items calls __getitem__ once per key, a
    # third of the encoding's time. The dict it keeps them in gives the same pairs in the same order.
    inner = getattr(attributes, "_dict", None)
    return inner if type(inner) is dict else attributes


_LOCAL = _fixed32(_FLAGS_HAS_IS_REMOTE)
_REMOTE = _fixed32(_FLAGS_HAS_IS_REMOTE | _FLAGS_IS_REMOTE)
_EMPTY_STATUS = b"\x7a\x00"
_MISSING = object()


def _flags(context: Any) -> bytes:
    return _REMOTE if context is not None and context.is_remote else _LOCAL


def _trace_state(key: bytes, trace_state: Any) -> bytes:
    if not trace_state:
        return b""
    return _text(key, ",".join(f"{k}={v}" for k, v in trace_state.items()))


def _count(key: bytes, value: int) -> bytes:
    return key + _varint(value) if value else b""


def _span(span: ReadableSpan) -> bytes:
    # Straight-line for the common span (no events, links, drops or trace state): this runs once per span. The
    # SDK's own ReadableSpan is read through its fields where its properties would copy them (attributes, events,
    # links); any other ReadableSpan through the properties.
    context = span.context
    parent = span.parent
    parts = [b"\x0a\x10", context.trace_id.to_bytes(16, "big"), b"\x12\x08", context.span_id.to_bytes(8, "big")]
    if context.trace_state:
        parts.append(_trace_state(b"\x1a", context.trace_state))
    if parent is not None:
        parts += (b"\x22\x08", parent.span_id.to_bytes(8, "big"))
    if span.name:
        parts.append(_text(b"\x2a", span.name))
    parts.append(_KIND[span.kind])
    if span.start_time:
        parts += (b"\x39", _fixed64(span.start_time))
    if span.end_time:
        parts += (b"\x41", _fixed64(span.end_time))
    attributes = getattr(span, "_attributes", _MISSING)
    if attributes is _MISSING:
        parts += (_attributes(b"\x4a", span.attributes), _count(b"\x50", span.dropped_attributes))
    else:
        parts += (_attributes(b"\x4a", _plain(attributes)), _count(b"\x50", getattr(attributes, "dropped", 0)))
    events, links = getattr(span, "_events", _MISSING), getattr(span, "_links", _MISSING)
    if (
        events is _MISSING
        or links is _MISSING
        or events
        or links
        or getattr(events, "dropped", 0)
        or getattr(links, "dropped", 0)
    ):
        parts.append(_events_and_links(span, span.events, span.links))
    status = span.status
    if status.description or status.status_code.value:
        status_body = (_text(b"\x12", status.description) if status.description else b"") + (
            b"\x18" + _varint(status.status_code.value) if status.status_code.value else b""
        )
        parts.append(_field(b"\x7a", status_body))
    else:
        parts.append(_EMPTY_STATUS)
    parts += (b"\x85\x01", _REMOTE if parent is not None and parent.is_remote else _LOCAL)
    return b"".join(parts)


def _events_and_links(span: ReadableSpan, events: Sequence[Any], links: Sequence[Any]) -> bytes:
    parts = []
    for event in events:
        body = (b"\x09" + _fixed64(event.timestamp) if event.timestamp else b"") + (
            _text(b"\x12", event.name) if event.name else b""
        )
        body += _attributes(b"\x1a", event.attributes) + _count(b"\x20", event.dropped_attributes)
        parts.append(_field(b"\x5a", body))
    parts.append(_count(b"\x60", span.dropped_events))
    for link in links:
        body = b"\x0a\x10" + link.context.trace_id.to_bytes(16, "big") + b"\x12\x08"
        body += link.context.span_id.to_bytes(8, "big")
        body += _attributes(b"\x22", link.attributes) + _count(b"\x28", link.dropped_attributes)
        body += b"\x35" + _flags(link.context)
        parts.append(_field(b"\x6a", body))
    parts.append(_count(b"\x70", span.dropped_links))
    return b"".join(parts)


def _scope(scope: Any) -> bytes:
    if scope is None:
        return b""
    name = _text(b"\x0a", scope.name) if scope.name else b""
    version = _text(b"\x12", scope.version) if scope.version else b""
    return name + version + _attributes(b"\x1a", scope.attributes)


def encode_spans(spans: Sequence[ReadableSpan]) -> bytes:
    """The serialized ExportTraceServiceRequest for `spans`, grouped by resource, then instrumentation scope."""
    # Grouped by object identity first: a Resource hashes by serializing itself to JSON, and every span of a
    # provider shares one Resource object. Equal resources that are distinct objects are merged after.
    by_object: dict[int, tuple[Any, dict[Any, list[bytes]]]] = {}
    for span in spans:
        entry = by_object.get(id(span.resource))
        if entry is None:
            entry = by_object[id(span.resource)] = (span.resource, {})
        entry[1].setdefault(span.instrumentation_scope or None, []).append(_field(b"\x12", _span(span)))
    grouped: dict[Any, dict[Any, list[bytes]]] = {}
    for resource, scopes in by_object.values():
        into = grouped.setdefault(resource, {})
        for scope, encoded in scopes.items():
            into.setdefault(scope, []).extend(encoded)
    out = []
    for resource, by_scope in grouped.items():
        body = _field(b"\x0a", _attributes(b"\x0a", resource.attributes))
        for scope, encoded in by_scope.items():
            scope_body = _field(b"\x0a", _scope(scope)) + b"".join(encoded)
            if scope is not None and scope.schema_url:
                scope_body += _text(b"\x1a", scope.schema_url)
            body += _field(b"\x12", scope_body)
        if resource.schema_url:
            body += _text(b"\x1a", resource.schema_url)
        out.append(_field(b"\x0a", body))
    return b"".join(out)
