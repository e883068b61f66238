"""Traces over OTLP: the real app over the fake engine, with the OTLP variables set,
exporting through the SDK's own exporters to real receivers on loopback
(``tests/otlp_receiver.py``): gRPC, and HTTP/protobuf."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from llm_fleet.deployments.errors import ConfigError
from llm_fleet.router.auth import KeyRing
from llm_fleet.router.keys_file import create_key, load_keys
from llm_fleet.router.tracing import (
    Door,
    RequestTracer,
    export_protocol,
    request_tracer_from_env,
)
from tests.fakes import (
    CHAT_MODEL,
    MAX_MODEL_LEN,
    MAX_TOKENS_LIMIT,
    RecordingMetrics,
    make_fleet,
    post_then_leave,
)
from tests.otlp_receiver import GrpcReceiver, HttpReceiver, ReceivedSpan
from tests.unit.ops_helpers import CHAT_PATH, COMPLETIONS_PATH, chat, request_for

SECRET_WORDS = "zanzibar quokka marmalade"  # the prompt; the fake engine echoes it back
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_SPAN_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_SPAN_ID}-01"
OTLP_VARIABLES = (
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_PROTOCOL",
    "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
    "OTEL_SERVICE_NAME",
    "SERVICE_NAME",
    "OTEL_SDK_DISABLED",
    "OTEL_TRACES_SAMPLER",
    "OTEL_RESOURCE_ATTRIBUTES",
)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only what each test sets: none of the machine's own OTel variables."""
    for name in OTLP_VARIABLES:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def grpc_receiver() -> Iterator[GrpcReceiver]:
    with GrpcReceiver() as receiver:
        yield receiver


def tracer_for(
    monkeypatch: pytest.MonkeyPatch, endpoint: str, door: Door = "router", **env: str
) -> RequestTracer:
    """The tracer a replica builds at its start, with these variables set."""
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    tracer = request_tracer_from_env(door, instance="replica-1")
    assert tracer is not None
    return tracer


def roots(spans: list[ReceivedSpan]) -> dict[str, ReceivedSpan]:
    """The request spans by request id."""
    return {
        s.attributes["llm_fleet.request_id"]: s
        for s in spans
        if "llm_fleet.request_id" in s.attributes
    }


def children(spans: list[ReceivedSpan], parent: ReceivedSpan) -> dict[str, ReceivedSpan]:
    return {s.name: s for s in spans if s.span.parent_span_id == parent.span.span_id}


# --- on and off -----------------------------------------------------------------------


def test_without_an_endpoint_no_tracer_is_built(monkeypatch: pytest.MonkeyPatch) -> None:
    assert request_tracer_from_env("router") is None
    monkeypatch.setenv("SERVICE_NAME", "gateway")  # a service name alone turns nothing on
    assert request_tracer_from_env("router") is None
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4317")
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")  # the spec's off switch wins
    assert request_tracer_from_env("direct") is None


def test_the_protocol_is_grpc_unless_the_variable_or_the_url_says_http() -> None:
    assert export_protocol({}, "http://collector:4317") == "grpc"
    assert export_protocol({}, "https://collector.example") == "grpc"
    assert export_protocol({}, "http://collector:4318") == "http/protobuf"
    assert export_protocol({}, "https://otlp.example/v1/traces") == "http/protobuf"
    http = {"OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}
    assert export_protocol(http, "http://collector:4317") == "http/protobuf"
    grpc_for_traces = {**http, "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "grpc"}
    assert export_protocol(grpc_for_traces, "http://collector:4318") == "grpc"
    with pytest.raises(ConfigError, match="http/json"):
        export_protocol({"OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"}, "http://collector:4318")


# --- spans over gRPC ------------------------------------------------------------------


def test_each_request_is_a_span_with_its_model_route_status_tokens_and_timings(
    monkeypatch: pytest.MonkeyPatch, grpc_receiver: GrpcReceiver
) -> None:
    tracer = tracer_for(monkeypatch, grpc_receiver.endpoint, SERVICE_NAME="gateway-eu")
    metrics = RecordingMetrics()
    fleet = make_fleet(tracer=tracer, metrics=metrics)
    before_ns = time.time_ns()
    with TestClient(fleet.app) as http:
        whole = http.post(CHAT_PATH, json=chat(SECRET_WORDS), headers={"traceparent": TRACEPARENT})
        path, body = request_for("completions", SECRET_WORDS, stream=True)
        stream = http.post(path, json=body)
        unknown = http.post(CHAT_PATH, json={**chat(SECRET_WORDS), "model": "no-such-model"})
        too_many = http.post(CHAT_PATH, json=chat(SECRET_WORDS, max_tokens=MAX_TOKENS_LIMIT + 1))
    after_ns = time.time_ns()
    assert [r.status_code for r in (whole, stream, unknown, too_many)] == [200, 200, 404, 400]
    assert tracer.provider.force_flush()

    spans = grpc_receiver.received.spans()
    by_id = roots(spans)
    ids = [r.headers["x-request-id"] for r in (whole, stream, unknown, too_many)]
    assert set(by_id) == set(ids)
    for span in spans:
        assert span.resource["service.name"] == "gateway-eu"
        assert span.resource["service.instance.id"] == "replica-1"
        assert before_ns <= span.span.start_time_unix_nano <= span.span.end_time_unix_nano
        assert span.span.end_time_unix_nano <= after_ns

    answer = by_id[ids[0]]
    assert answer.name == "POST /v1/chat/completions"
    assert answer.span.kind == Span.SpanKind.SPAN_KIND_SERVER
    assert answer.span.trace_id == bytes.fromhex(TRACE_ID)  # the caller's trace
    assert answer.span.parent_span_id == bytes.fromhex(PARENT_SPAN_ID)
    usage = whole.json()["usage"]
    timings = {name for name in answer.attributes if name.endswith("_ms")}
    assert timings == {f"llm_fleet.{p}_ms" for p in ("routing", "queue", "engine", "total")}
    assert {k: v for k, v in answer.attributes.items() if k not in timings} == {
        "http.request.method": "POST",
        "http.route": "/v1/chat/completions",
        "http.response.status_code": 200,
        "gen_ai.operation.name": "chat",
        "gen_ai.request.model": CHAT_MODEL,
        "gen_ai.usage.input_tokens": usage["prompt_tokens"],
        "gen_ai.usage.output_tokens": usage["completion_tokens"],
        "llm_fleet.request_id": ids[0],
        "llm_fleet.door": "router",
        "llm_fleet.stream": False,
        "llm_fleet.client_disconnected": False,
    }
    assert answer.span.status.code == Status.StatusCode.STATUS_CODE_UNSET
    # The span lasts what the request's record measured, the phases inside it, in order.
    record = next(r for r in metrics.finished if r.request_id == ids[0])
    lasted_ns = answer.span.end_time_unix_nano - answer.span.start_time_unix_nano
    assert lasted_ns == pytest.approx(record.latency_s * 1e9, abs=1e6)
    phases = children(spans, answer)
    assert list(phases) == ["routing", "queue", "engine"]
    assert phases["routing"].span.start_time_unix_nano == answer.span.start_time_unix_nano
    for first, then in zip(list(phases.values()), list(phases.values())[1:], strict=False):
        assert first.span.end_time_unix_nano == then.span.start_time_unix_nano
        assert first.span.trace_id == bytes.fromhex(TRACE_ID)
    assert phases["engine"].span.end_time_unix_nano <= answer.span.end_time_unix_nano
    engine_ms = (
        phases["engine"].span.end_time_unix_nano - phases["engine"].span.start_time_unix_nano
    ) / 1e6
    assert engine_ms == pytest.approx(answer.attributes["llm_fleet.engine_ms"], abs=0.01)

    streamed = by_id[ids[1]]
    assert streamed.name == "POST /v1/completions"
    assert streamed.span.trace_id != bytes.fromhex(TRACE_ID)  # no traceparent: a new trace
    assert streamed.span.parent_span_id == b""
    assert streamed.attributes["gen_ai.operation.name"] == "text_completion"
    assert streamed.attributes["llm_fleet.stream"] is True
    assert streamed.attributes["gen_ai.usage.output_tokens"] == len(SECRET_WORDS.split())
    assert streamed.attributes["llm_fleet.frames"] == len(SECRET_WORDS.split())
    assert streamed.attributes["llm_fleet.ttft_ms"] > 0
    stream_phases = children(spans, streamed)
    assert list(stream_phases) == ["routing", "stream"]
    assert [e.name for e in stream_phases["stream"].span.events] == ["first_frame"]

    not_found = by_id[ids[2]]
    assert not_found.attributes["http.response.status_code"] == 404
    assert not_found.attributes["gen_ai.request.model"] == "unknown"  # never the client's text
    assert not_found.attributes["llm_fleet.error_code"] == "model_not_found"
    assert not_found.attributes["llm_fleet.error_type"] == "invalid_request_error"
    assert not_found.attributes["llm_fleet.rejection"] == "allowlist"
    assert not_found.attributes["error.type"] == "model_not_found"
    assert not_found.span.status.code == Status.StatusCode.STATUS_CODE_ERROR
    assert not_found.span.status.message == "model_not_found"
    assert children(spans, not_found) == {}  # it never reached a model

    refused = by_id[ids[3]]
    assert refused.attributes["http.response.status_code"] == 400
    assert refused.attributes["error.type"] == "max_tokens_exceeded"
    assert refused.attributes["llm_fleet.rejection"] == "limits"
    assert refused.span.status.code == Status.StatusCode.STATUS_CODE_ERROR

    raw = grpc_receiver.received.raw()
    for word in SECRET_WORDS.split():
        assert word.encode() not in raw


def test_an_engine_error_is_an_error_span_with_the_engine_time(
    monkeypatch: pytest.MonkeyPatch, grpc_receiver: GrpcReceiver
) -> None:
    tracer = tracer_for(monkeypatch, grpc_receiver.endpoint)
    fleet = make_fleet(tracer=tracer)
    with TestClient(fleet.app) as http:
        response = http.post(CHAT_PATH, json=chat(" ".join(["word"] * (MAX_MODEL_LEN + 1))))
    assert response.status_code == 400
    assert tracer.provider.force_flush()
    spans = grpc_receiver.received.spans()
    (span,) = roots(spans).values()
    assert span.resource["service.name"] == "llm-fleet"  # the default
    assert span.attributes["error.type"] == "context_length_exceeded"
    assert "llm_fleet.rejection" not in span.attributes  # the engine answered
    assert span.span.status.code == Status.StatusCode.STATUS_CODE_ERROR
    assert list(children(spans, span)) == ["routing", "queue", "engine"]


def test_no_key_and_no_authorization_value_in_any_span(
    monkeypatch: pytest.MonkeyPatch, grpc_receiver: GrpcReceiver, tmp_path: Path
) -> None:
    keys_path = tmp_path / "keys.yaml"
    key = create_key(keys_path, "team-a")
    ring = KeyRing.from_file(keys_path, poll_s=0)
    tracer = tracer_for(monkeypatch, grpc_receiver.endpoint)
    fleet = make_fleet(tracer=tracer, keys=ring)
    with TestClient(fleet.app) as http:
        ok = http.post(CHAT_PATH, json=chat(), headers={"Authorization": f"Bearer {key}"})
        wrong = http.post(CHAT_PATH, json=chat(), headers={"Authorization": "Bearer sk-wrong-one"})
    assert (ok.status_code, wrong.status_code) == (200, 401)
    assert tracer.provider.force_flush()
    by_id = roots(grpc_receiver.received.spans())
    # The key's id, as the access line logs it; never the key.
    key_id = by_id[ok.headers["x-request-id"]].attributes["llm_fleet.key_id"]
    assert key_id == load_keys(keys_path).keys[0].id
    assert by_id[wrong.headers["x-request-id"]].attributes["error.type"] == "invalid_api_key"
    raw = grpc_receiver.received.raw()
    assert key.encode() not in raw
    assert b"sk-wrong-one" not in raw
    assert b"Bearer" not in raw


def test_a_client_that_leaves_mid_stream_is_marked(
    monkeypatch: pytest.MonkeyPatch, grpc_receiver: GrpcReceiver
) -> None:
    tracer = tracer_for(monkeypatch, grpc_receiver.endpoint)
    fleet = make_fleet(tracer=tracer, token_delay_s=0.05)
    body = chat("count with me", stream=True, max_tokens=MAX_TOKENS_LIMIT, ignore_eos=True)
    asyncio.run(post_then_leave(fleet.app, CHAT_PATH, body, leave_after_s=0.3))
    assert tracer.provider.force_flush()
    (span,) = roots(grpc_receiver.received.spans()).values()
    assert span.attributes["llm_fleet.client_disconnected"] is True
    assert span.attributes["http.response.status_code"] == 499
    assert "client_disconnected" in [e.name for e in span.span.events]
    assert span.span.status.code == Status.StatusCode.STATUS_CODE_UNSET  # not the server's fault


def test_stopping_the_tracer_flushes_what_is_left(
    monkeypatch: pytest.MonkeyPatch, grpc_receiver: GrpcReceiver
) -> None:
    # A long batch delay: only the stop can have sent the span.
    tracer = tracer_for(monkeypatch, grpc_receiver.endpoint, OTEL_BSP_SCHEDULE_DELAY="600000")
    fleet = make_fleet(tracer=tracer)
    with TestClient(fleet.app) as http:
        assert http.post(CHAT_PATH, json=chat()).status_code == 200
    assert grpc_receiver.received.spans() == []
    asyncio.run(tracer.stop())
    asyncio.run(tracer.stop())  # a second stop is harmless
    assert len(roots(grpc_receiver.received.spans())) == 1


# --- HTTP/protobuf ---------------------------------------------------------------------


def test_spans_over_http_protobuf_when_the_protocol_says_so(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with HttpReceiver() as receiver:
        tracer = tracer_for(
            monkeypatch, receiver.endpoint, "direct", OTEL_EXPORTER_OTLP_PROTOCOL="http/protobuf"
        )
        fleet = make_fleet(tracer=tracer)
        with TestClient(fleet.app) as http:
            response = http.post(
                COMPLETIONS_PATH,
                json=request_for("completions", SECRET_WORDS)[1],
                headers={"traceparent": TRACEPARENT},
            )
        assert response.status_code == 200
        assert tracer.provider.force_flush()
        asyncio.run(tracer.stop())
    assert set(receiver.paths) == {"/v1/traces"}  # the spec's path, added to the base URL
    span = roots(receiver.received.spans())[response.headers["x-request-id"]]
    assert span.span.trace_id == bytes.fromhex(TRACE_ID)
    assert span.attributes["llm_fleet.door"] == "direct"
    assert span.attributes["gen_ai.usage.output_tokens"] == len(SECRET_WORDS.split())
    assert span.resource["service.name"] == "llm-fleet"
    for word in SECRET_WORDS.split():
        assert word.encode() not in receiver.received.raw()


# --- tracing never fails a request ------------------------------------------------------


def test_a_collector_that_is_down_costs_the_requests_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with GrpcReceiver() as gone:
        endpoint = gone.endpoint  # a free port, closed again below
    tracer = tracer_for(monkeypatch, endpoint, OTEL_EXPORTER_OTLP_TIMEOUT="1")
    fleet = make_fleet(tracer=tracer)
    started = time.monotonic()
    with TestClient(fleet.app) as http:
        statuses = [http.post(CHAT_PATH, json=chat()).status_code for _ in range(3)]
    assert statuses == [200, 200, 200]
    assert time.monotonic() - started < 2  # exports wait in the background, not in requests
    asyncio.run(tracer.stop())  # gives up within the exporter's timeout


def test_a_span_that_cannot_be_made_is_logged_and_the_request_closes_out(
    monkeypatch: pytest.MonkeyPatch, grpc_receiver: GrpcReceiver, caplog: pytest.LogCaptureFixture
) -> None:
    tracer = tracer_for(monkeypatch, grpc_receiver.endpoint)

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("tracer broke")

    monkeypatch.setattr(tracer._tracer, "start_span", broken)
    metrics = RecordingMetrics()
    fleet = make_fleet(tracer=tracer, metrics=metrics)
    with TestClient(fleet.app) as http:
        whole = http.post(CHAT_PATH, json=chat())
        stream = http.post(CHAT_PATH, json=chat(stream=True))
    assert (whole.status_code, stream.status_code) == (200, 200)
    assert [r.status for r in metrics.finished] == [200, 200]
    assert "tracing: no span for request" in caplog.text
