"""Traces over OTLP: one span per inference request, exported with the OpenTelemetry SDK.

Off unless ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``) is
set where the replica runs: then :func:`request_tracer_from_env` builds one
:class:`RequestTracer` per replica at its start (``router/ingress.py``,
``router/direct.py``), and the replica's stop flushes and shuts it down. Off, nothing
is built and a request costs one ``None`` check (``Pipeline.finisher``).

The span is made when the request's record is finished (``Pipeline.finisher``, which
every way a request ends reaches), with the record's own start and end times: name
``POST <route>``, kind SERVER, the child of an incoming W3C ``traceparent``. It holds
what the access line holds (model, route, status, token counts, request id, the key's
id, disconnects, the error's code and type) and the timings Server-Timing tells, as
child spans (``routing``, ``queue``, ``engine``; a stream's ``stream``) and as
attributes. Never prompt or completion text, never a header's value, never a key.

The environment follows the OpenTelemetry spec's names; the exporters read the rest
themselves (``OTEL_EXPORTER_OTLP_HEADERS``, ``..._TIMEOUT``, ``..._CERTIFICATE``,
``..._INSECURE``), the provider reads ``OTEL_TRACES_SAMPLER`` (default: parent-based,
always on), the batch processor ``OTEL_BSP_*`` and the resource
``OTEL_RESOURCE_ATTRIBUTES``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Literal
from urllib.parse import urlparse

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from llm_fleet.deployments.errors import ConfigError
from llm_fleet.router.routes import ROUTE_PATHS

if TYPE_CHECKING:
    from opentelemetry.sdk.trace.export import SpanExporter

    from llm_fleet.router.accounting import RequestRecord

logger = logging.getLogger(__name__)

DEFAULT_SERVICE_NAME = "llm-fleet"
Door = Literal["router", "direct"]
Protocol = Literal["grpc", "http/protobuf"]
# The GenAI semantic conventions' operation names for our two routes.
OPERATIONS = {"chat": "chat", "completions": "text_completion"}
HTTP_PORT = 4318  # OTLP/HTTP's default port; gRPC's is 4317
TRACES_PATH = "/v1/traces"


def tracing_endpoint(environ: Mapping[str, str]) -> str | None:
    """The OTLP endpoint traces go to, or None: tracing is off."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    for name in ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT"):
        value = environ.get(name, "").strip()
        if value:
            return value
    return None


def export_protocol(environ: Mapping[str, str], endpoint: str) -> Protocol:
    """gRPC unless ``OTEL_EXPORTER_OTLP_[TRACES_]PROTOCOL`` says ``http/protobuf``, or,
    with neither set, the URL does (OTLP/HTTP's port 4318, or a ``/v1/traces`` path)."""
    for name in ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"):
        value = environ.get(name, "").strip()
        if value in ("grpc", "http/protobuf"):
            return value  # type: ignore[return-value]
        if value:
            raise ConfigError(
                f"{name}={value!r}: llm-fleet exports traces over 'grpc' or 'http/protobuf'"
            )
    url = urlparse(endpoint)
    says_http = url.port == HTTP_PORT or url.path.rstrip("/").endswith(TRACES_PATH)
    return "http/protobuf" if says_http else "grpc"


def service_name(environ: Mapping[str, str]) -> str:
    """The spec's ``OTEL_SERVICE_NAME``, else ``SERVICE_NAME``, else ``llm-fleet``."""
    for name in ("OTEL_SERVICE_NAME", "SERVICE_NAME"):
        value = environ.get(name, "").strip()
        if value:
            return value
    return DEFAULT_SERVICE_NAME


def span_exporter(environ: Mapping[str, str], endpoint: str, protocol: Protocol) -> SpanExporter:
    """The SDK's OTLP exporter for ``protocol``; only that one's module is imported."""
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter(endpoint=endpoint)
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
        OTLPSpanExporter as HTTPSpanExporter,
    )

    # The spec: the signal's own endpoint is used as it is, the generic one gets the
    # signal's path (unless it already ends with it).
    generic = not environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip()
    if generic and not endpoint.rstrip("/").endswith(TRACES_PATH):
        endpoint = endpoint.rstrip("/") + TRACES_PATH
    return HTTPSpanExporter(endpoint=endpoint)


def request_tracer_from_env(
    door: Door, *, instance: str | None = None, environ: Mapping[str, str] | None = None
) -> RequestTracer | None:
    """The replica's tracer, or None when no OTLP endpoint is set (nothing is built).

    ``door``: which door the replica is (``router`` or ``direct``), a span attribute;
    ``instance``: the replica's id, the resource's ``service.instance.id``. A protocol
    the SDK cannot export is a ``ConfigError``: the replica fails to start with it.
    """
    environ = os.environ if environ is None else environ
    endpoint = tracing_endpoint(environ)
    if endpoint is None:
        return None
    protocol = export_protocol(environ, endpoint)
    attributes = {"service.name": service_name(environ)}
    if instance is not None:
        attributes["service.instance.id"] = instance
    # Our own provider, not the global one: nothing else in the process is touched.
    provider = TracerProvider(resource=Resource.create(attributes))
    provider.add_span_processor(BatchSpanProcessor(span_exporter(environ, endpoint, protocol)))
    url = urlparse(endpoint)  # logged without any user:password in it
    where = f"{url.scheme}://{url.netloc.rpartition('@')[2]}{url.path}"
    logger.info("tracing: spans of the %s door go to %s over %s", door, where, protocol)
    return RequestTracer(provider, door)


class RequestTracer:
    """Turns a finished request's record into its span (see the module docstring)."""

    def __init__(self, provider: TracerProvider, door: Door):
        self.provider = provider
        self._door = door
        self._tracer = provider.get_tracer(__name__)
        self._propagator = TraceContextTextMapPropagator()
        self._stopped = False

    def request_finished(self, record: RequestRecord, headers: Mapping[str, str]) -> None:
        """Record ``record``'s span (exported in the background); never raises."""
        try:
            self._record(record, headers)
        except Exception:
            logger.exception("tracing: no span for request %s", record.request_id)

    def _record(self, record: RequestRecord, headers: Mapping[str, str]) -> None:
        # The record's times are perf_counter readings: place them on the wall clock.
        now_ns, now = time.time_ns(), time.perf_counter()

        def wall(at: float) -> int:
            return now_ns - int((now - at) * 1e9)

        end = record.finished_at or now
        path = record.path or ROUTE_PATHS[record.endpoint]
        parent = self._propagator.extract(headers)  # reads traceparent and tracestate only
        span = self._tracer.start_span(
            f"POST {path}",
            context=parent,
            kind=SpanKind.SERVER,
            start_time=wall(record.started),
            attributes=span_attributes(record, path, self._door),
        )
        within = trace.set_span_in_context(span)
        phases = record.phases() if record.dispatched_at is not None else []
        if record.stream and record.dispatched_at is not None:
            phases.append(("stream", record.dispatched_at, end))
        for name, start, stop in phases:
            span.set_attribute(f"llm_fleet.{name}_ms", round((stop - start) * 1000, 3))
            child = self._tracer.start_span(name, context=within, start_time=wall(start))
            if name == "stream" and record.first_frame_at is not None:
                child.add_event("first_frame", timestamp=wall(record.first_frame_at))
            child.end(end_time=wall(stop))
        if record.disconnected:
            span.add_event("client_disconnected", timestamp=wall(end))
        elif record.status >= 400:
            error = record.error_code or str(record.status)
            span.set_attribute("error.type", error)
            span.set_status(Status(StatusCode.ERROR, error))
        span.end(end_time=wall(end))

    async def stop(self) -> None:
        """Flush what is left and shut the exporter down (the replica is stopping)."""
        if not self._stopped:
            self._stopped = True
            await asyncio.to_thread(self.provider.shutdown)


Attribute = str | int | float | bool


def span_attributes(record: RequestRecord, path: str, door: Door) -> dict[str, Attribute]:
    """What a request's span says about it (never a text, a header or a key)."""
    attributes: dict[str, Attribute | None] = {
        "http.request.method": "POST",
        "http.route": path,
        "http.response.status_code": record.status,
        "gen_ai.operation.name": OPERATIONS[record.endpoint],
        "gen_ai.request.model": record.model,
        "gen_ai.usage.input_tokens": record.prompt_tokens,
        "gen_ai.usage.output_tokens": record.completion_tokens,
        "llm_fleet.request_id": record.request_id,
        "llm_fleet.door": door,
        "llm_fleet.stream": record.stream,
        "llm_fleet.key_id": record.key,
        "llm_fleet.client_disconnected": record.disconnected,
        "llm_fleet.error_code": record.error_code,
        "llm_fleet.error_type": record.error_type,
        "llm_fleet.rejection": record.rejection,
        "llm_fleet.total_ms": round(record.latency_s * 1000, 3),
    }
    if record.stream:
        attributes["llm_fleet.frames"] = record.frames
        attributes["llm_fleet.tokens_after_disconnect"] = record.tokens_after_disconnect
        ttft, itl = record.ttft_s, record.itl_s
        attributes["llm_fleet.ttft_ms"] = None if ttft is None else round(ttft * 1000, 3)
        attributes["llm_fleet.itl_ms"] = None if itl is None else round(itl * 1000, 3)
    return {name: value for name, value in attributes.items() if value is not None}
