"""The OTLP span exporters of opentelemetry-exporter-otlp (HTTP/protobuf and gRPC), with the span encoding of
telemetry/otlp_encoding.py instead of the library's protobuf objects.

Everything else is the library's: endpoint and header settings, TLS, compression, retries with backoff, size
limits, timeouts, its own metrics. The HTTP exporter has no hook for the encoding, so `export` is the library's
method (opentelemetry-exporter-otlp-proto-http 1.45) with one line changed; if a later release moves what it relies
on, the library's own `export` runs instead, slower but correct (tests/test_otlp_encoding.py checks which one runs).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from functools import cache

from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpSpanExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from telemetry.otlp_encoding import encode_spans

_log = logging.getLogger(__name__)
_HTTP_INTERNALS = ("_shutdown", "_metrics", "_client", "_max_request_size")


class HttpExporter(HttpSpanExporter):
    """OTLP over HTTP/protobuf."""

    @property
    def lean(self) -> bool:
        """Whether the library still has what the lean `export` relies on."""
        return all(hasattr(self, name) for name in _HTTP_INTERNALS) and hasattr(self._client, "export")

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        if not self.lean:
            return super().export(spans)
        if self._shutdown:
            _log.warning("Exporter already shutdown, ignoring batch")
            return SpanExportResult.FAILURE
        with self._metrics.export_operation(len(spans)) as result:
            try:
                serialized = encode_spans(spans)
            except Exception as error:  # the library's contract: a failed batch, never an exception
                _log.error("Failed to encode span batch: %s", error)
                result.error = error
                return SpanExportResult.FAILURE
            if 0 < self._max_request_size < len(serialized):
                _log.warning(
                    "Dropping span batch: serialized size %d bytes exceeds max_request_size %d bytes.",
                    len(serialized),
                    self._max_request_size,
                )
                result.error = ValueError(f"span batch of {len(serialized)} bytes over {self._max_request_size}")
                return SpanExportResult.FAILURE
            sent = self._client.export(serialized)
            if not sent.success:
                result.error = sent.error
                if sent.status_code is not None:
                    result.error_attrs = {"http.response.status_code": sent.status_code}
                return SpanExportResult.FAILURE
        return SpanExportResult.SUCCESS


@cache
def grpc_exporter_class() -> Callable[..., SpanExporter]:
    """OTLP over gRPC. Built on first use: the library's gRPC exporter loads grpcio, which a bot exporting over
    HTTP never needs. The library builds its request in `_translate_data`, a method meant for subclasses; parsing
    our bytes back (in C) costs far less than building the request object by object in Python."""
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    class GrpcExporter(OTLPSpanExporter):
        def _translate_data(self, data: Sequence[ReadableSpan]) -> ExportTraceServiceRequest:
            request: ExportTraceServiceRequest = ExportTraceServiceRequest.FromString(encode_spans(data))
            return request

    return GrpcExporter
