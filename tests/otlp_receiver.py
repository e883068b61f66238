"""Real OTLP trace receivers on loopback, for the tracing tests.

The OpenTelemetry Collector is not installable here; these stand where it would, on
the protocol's own definitions: :class:`GrpcReceiver` is a gRPC server of
opentelemetry-proto's ``TraceService``, :class:`HttpReceiver` answers OTLP/HTTP's
``POST /v1/traces`` with protobuf bodies. Both keep every export request as it came
(the bytes, to search, and the parsed message).
"""

from __future__ import annotations

import gzip
import threading
from collections.abc import Iterable
from concurrent import futures
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2_grpc import (
    TraceServiceServicer,
    add_TraceServiceServicer_to_server,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span


def value_of(value: AnyValue) -> Any:
    """An attribute's value as Python (the kinds our spans use)."""
    kind = value.WhichOneof("value")
    return None if kind is None else getattr(value, kind)


def attributes_of(pairs: Iterable[KeyValue]) -> dict[str, Any]:
    return {pair.key: value_of(pair.value) for pair in pairs}


@dataclass
class ReceivedSpan:
    """One span as the receiver got it, with its resource's attributes."""

    span: Span
    resource: dict[str, Any]

    @property
    def name(self) -> str:
        return self.span.name

    @property
    def attributes(self) -> dict[str, Any]:
        return attributes_of(self.span.attributes)


@dataclass
class Received:
    """What a receiver has been sent: raw bodies and the parsed export requests."""

    bodies: list[bytes] = field(default_factory=list)
    requests: list[ExportTraceServiceRequest] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, body: bytes) -> None:
        with self._lock:
            self.bodies.append(body)
            self.requests.append(ExportTraceServiceRequest.FromString(body))

    def spans(self) -> list[ReceivedSpan]:
        with self._lock:
            return [
                ReceivedSpan(span, attributes_of(resource_spans.resource.attributes))
                for request in self.requests
                for resource_spans in request.resource_spans
                for scope_spans in resource_spans.scope_spans
                for span in scope_spans.spans
            ]

    def raw(self) -> bytes:
        with self._lock:
            return b"".join(self.bodies)


class _TraceService(TraceServiceServicer):
    def __init__(self, received: Received):
        self._received = received

    def Export(  # the service's own method name
        self, request: ExportTraceServiceRequest, context: grpc.ServicerContext
    ) -> ExportTraceServiceResponse:
        self._received.add(request.SerializeToString())
        return ExportTraceServiceResponse()


class GrpcReceiver:
    """OTLP over gRPC on ``127.0.0.1``, on a free port; ``endpoint`` is its URL."""

    def __init__(self) -> None:
        self.received = Received()
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        add_TraceServiceServicer_to_server(  # type: ignore[no-untyped-call]
            _TraceService(self.received), self._server
        )
        port = self._server.add_insecure_port("127.0.0.1:0")
        self.endpoint = f"http://127.0.0.1:{port}"

    def __enter__(self) -> GrpcReceiver:
        self._server.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.stop(grace=None)


class HttpReceiver:
    """OTLP/HTTP (protobuf) on ``127.0.0.1``: ``POST /v1/traces``; ``endpoint`` is the
    base URL (the exporter adds the path), ``paths`` every path posted to."""

    def __init__(self) -> None:
        self.received = Received()
        self.paths: list[str] = []
        received, paths = self.received, self.paths

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # http.server's name
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                paths.append(self.path)
                if self.path != "/v1/traces":
                    self.send_error(404)
                    return
                received.add(body)
                answer = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, format: str, *args: Any) -> None:
                return None

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> HttpReceiver:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
