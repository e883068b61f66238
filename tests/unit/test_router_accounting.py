"""Per-request accounting over the fake engine: Server-Timing, stream usage, metrics
records, the access log."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from ray._common.formatters import JSONFormatter
from starlette.types import Message

from tests.fake_handle import BACK_PRESSURE
from tests.fakes import (
    CHAT_MODEL,
    COMPLETIONS_MODEL,
    MAX_MODEL_LEN,
    MAX_TOKENS_LIMIT,
    NOT_ALLOWED_MODEL,
    FakeStatusSource,
    RecordingMetrics,
    make_fleet,
    post_then_leave,
)

if TYPE_CHECKING:
    import httpx2  # what starlette's TestClient is built on

from tests.unit.ops_helpers import (
    CHAT_PATH,
    COMPLETIONS_PATH,
    chat,
    openai_error,
    queue_policy,
    request_for,
    server_timing,
    sse_payloads,
)

# --- Server-Timing ------------------------------------------------------------------


def test_server_timing_splits_routing_queue_engine_and_total() -> None:
    words, delay_s = 5, 0.02
    fleet = make_fleet(token_delay_s=delay_s)
    with TestClient(fleet.app) as http:
        response = http.post(CHAT_PATH, json=chat(" ".join(["w"] * words)))
    assert response.status_code == 200
    timings = server_timing(response)
    assert list(timings) == ["routing", "queue", "engine", "total"]
    assert timings["engine"] >= words * delay_s * 1000 * 0.9
    assert timings["routing"] < timings["engine"]  # the router's own work is small
    parts = timings["routing"] + timings["queue"] + timings["engine"]
    assert parts == pytest.approx(timings["total"], abs=0.3)  # each rounded to 0.1 ms


def test_server_timing_on_an_engine_refusal_has_the_engine_time() -> None:
    fleet = make_fleet()
    too_long = " ".join(["word"] * (MAX_MODEL_LEN + 1))
    with TestClient(fleet.app) as http:
        response = http.post(CHAT_PATH, json=chat(too_long))
    openai_error(response, 400, "context_length_exceeded")
    assert list(server_timing(response)) == ["routing", "queue", "engine", "total"]


def test_no_server_timing_on_streams_or_router_refusals() -> None:
    fleet = make_fleet()
    with TestClient(fleet.app) as http:
        stream = http.post(CHAT_PATH, json=chat(stream=True))
        refused = http.post(CHAT_PATH, json=chat(max_tokens=MAX_TOKENS_LIMIT + 1))
    assert stream.status_code == 200
    assert "server-timing" not in stream.headers
    openai_error(refused, 400, "max_tokens_exceeded")
    assert "server-timing" not in refused.headers


# --- usage of streams ------------------------------------------------------------------


@pytest.mark.parametrize("stream_options", [None, {}, {"include_usage": False}])
@pytest.mark.parametrize("route", ["chat", "completions"])
def test_a_stream_without_usage_asked_has_no_usage_chunk_but_is_counted(
    route: str, stream_options: dict[str, Any] | None
) -> None:
    metrics = RecordingMetrics()
    fields: dict[str, Any] = {"stream": True}
    if stream_options is not None:
        fields["stream_options"] = stream_options
    path, body = request_for(route, "one two three", **fields)
    with TestClient(make_fleet(metrics=metrics).app) as http:
        response = http.post(path, json=body)
    chunks = sse_payloads(response)
    assert chunks and all(chunk["choices"] for chunk in chunks)
    assert not [chunk for chunk in chunks if "usage" in chunk]
    [record] = metrics.finished
    assert (record.prompt_tokens, record.completion_tokens) == (3, 3)


@pytest.mark.parametrize("route", ["chat", "completions"])
def test_a_stream_with_usage_asked_gets_it(route: str) -> None:
    metrics = RecordingMetrics()
    path, body = request_for(
        route, "one two three four", stream=True, stream_options={"include_usage": True}
    )
    with TestClient(make_fleet(metrics=metrics).app) as http:
        chunks = sse_payloads(http.post(path, json=body))
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == {"prompt_tokens": 4, "completion_tokens": 4, "total_tokens": 8}
    assert [chunk for chunk in chunks if chunk["choices"] == []] == [chunks[-1]]
    [record] = metrics.finished
    assert (record.prompt_tokens, record.completion_tokens) == (4, 4)


# --- metrics records ---------------------------------------------------------------------


def _post_json(path: str, body: dict[str, Any]) -> Callable[[TestClient], httpx2.Response]:
    return lambda http: http.post(path, json=body)


def _post_raw(raw: bytes) -> Callable[[TestClient], httpx2.Response]:
    headers = {"content-type": "application/json"}
    return lambda http: http.post(CHAT_PATH, content=raw, headers=headers)


REFUSALS = [
    pytest.param(
        _post_json(CHAT_PATH, chat(model="gpt-17")),
        (404, "unknown", "allowlist", "model_not_found"),
        id="unknown-model",
    ),
    pytest.param(
        _post_json(CHAT_PATH, chat(model=NOT_ALLOWED_MODEL)),
        (404, "unknown", "allowlist", "model_not_found"),
        id="configured-but-not-allowed",
    ),
    pytest.param(
        _post_json(CHAT_PATH, chat(max_tokens=MAX_TOKENS_LIMIT + 1)),
        (400, CHAT_MODEL, "limits", "max_tokens_exceeded"),
        id="max-tokens-over-the-limit",
    ),
    pytest.param(
        _post_json(CHAT_PATH, chat("x" * 2000)),
        (413, "unknown", "limits", "request_too_large"),
        id="body-too-large",
    ),
    pytest.param(
        _post_raw(b"{not json"),
        (400, "unknown", "bad_request", "invalid_json"),
        id="invalid-json",
    ),
    pytest.param(
        _post_json(CHAT_PATH, chat(max_tokens="a")),
        (400, "unknown", "bad_request", "invalid_value"),
        id="field-of-the-wrong-type",
    ),
    pytest.param(
        _post_json(COMPLETIONS_PATH, {"model": COMPLETIONS_MODEL, "prompt": "hi"}),
        (503, COMPLETIONS_MODEL, "unavailable", "model_not_ready"),
        id="model-not-ready",
    ),
]


@pytest.mark.parametrize(("send", "expected"), REFUSALS)
def test_a_refused_request_is_recorded_with_its_reason(
    send: Callable[[TestClient], httpx2.Response], expected: tuple[int, str, str, str]
) -> None:
    status, metrics = FakeStatusSource(), RecordingMetrics()
    status.set(CHAT_MODEL, "ready")
    status.set(COMPLETIONS_MODEL, "loading")
    fleet = make_fleet(status=status, metrics=metrics, max_request_bytes=1024)
    with TestClient(fleet.app) as http:
        response = send(http)
    code, _, _, error_code = expected
    openai_error(response, code, error_code)
    assert metrics.dispatched == []
    [record] = metrics.finished
    assert (record.status, record.model, record.rejection, record.error_code) == expected
    assert record.request_id == response.headers["x-request-id"]


def test_back_pressure_is_recorded_as_an_overload_rejection() -> None:
    metrics = RecordingMetrics()
    fleet = make_fleet(metrics=metrics, handle_options={"refuse": BACK_PRESSURE})
    with TestClient(fleet.app) as http:
        response = http.post(CHAT_PATH, json=chat())
    openai_error(response, 503, "service_unavailable")
    [record] = metrics.finished
    assert (record.status, record.model) == (503, CHAT_MODEL)
    assert record.rejection == "overload"


def test_back_pressure_is_recorded_once_and_leaves_nothing_in_flight() -> None:
    metrics = RecordingMetrics()
    fleet = make_fleet(metrics=metrics, handle_options={"refuse": BACK_PRESSURE})
    with TestClient(fleet.app) as http:
        http.post(CHAT_PATH, json=chat())
    assert_paired(metrics, dispatched=1)
    assert (metrics.finished[0].status, metrics.finished[0].error_code) == (
        503,
        "service_unavailable",
    )


def test_an_engine_refusal_is_no_rejection() -> None:
    metrics = RecordingMetrics()
    too_long = " ".join(["word"] * (MAX_MODEL_LEN + 1))
    with TestClient(make_fleet(metrics=metrics).app) as http:
        http.post(CHAT_PATH, json=chat(too_long))
    assert_paired(metrics, dispatched=1)
    [record] = metrics.finished
    assert (record.status, record.error_code, record.rejection) == (
        400,
        "context_length_exceeded",
        None,
    )


def assert_paired(metrics: RecordingMetrics, *, dispatched: int) -> None:
    """Each request finished once; the dispatched ones are among them, each once."""
    finished_ids = [id(record) for record in metrics.finished]
    assert len(set(finished_ids)) == len(finished_ids)
    assert len(metrics.dispatched) == dispatched
    assert len({id(record) for record in metrics.dispatched}) == dispatched
    assert all(id(record) in finished_ids for record in metrics.dispatched)
    assert all(record.dispatched_at is not None for record in metrics.dispatched)


@pytest.mark.parametrize("stream", [False, True])
def test_a_served_request_is_dispatched_and_finished_once(stream: bool) -> None:
    metrics, delay_s = RecordingMetrics(), 0.01
    with TestClient(make_fleet(token_delay_s=delay_s, metrics=metrics).app) as http:
        sent = time.perf_counter()
        response = http.post(CHAT_PATH, json=chat("a b c d", stream=stream))
        answered = time.perf_counter()
    assert response.status_code == 200
    assert_paired(metrics, dispatched=1)
    [record] = metrics.finished
    assert (record.model, record.endpoint, record.stream, record.status) == (
        CHAT_MODEL,
        "chat",
        stream,
        200,
    )
    assert (record.prompt_tokens, record.completion_tokens) == (4, 4)
    assert record.rejection is None and not record.disconnected
    # Four tokens, one per delay, inside what the client waited.
    assert 4 * delay_s * 0.9 <= record.latency_s <= answered - sent
    if stream:
        # The first frame (the role) comes before any token; the tokens take their time.
        assert record.ttft_s is not None and 0 < record.ttft_s < record.latency_s - 3 * delay_s
        assert record.itl_s is not None and record.itl_s >= delay_s * 0.9  # per gap
    else:
        assert record.ttft_s is None


def test_a_stream_failing_midway_is_finished_once_as_500() -> None:
    metrics = RecordingMetrics()
    fleet = make_fleet(
        metrics=metrics,
        handle_options={"death": RuntimeError("replica died"), "die_after": 3},
    )
    with TestClient(fleet.app) as http:
        response = http.post(CHAT_PATH, json=chat("a b c d e f", stream=True))
    assert response.status_code == 200  # the headers had gone; the failure is a frame
    assert_paired(metrics, dispatched=1)
    assert metrics.finished[0].status == 500


def test_many_requests_pair_up() -> None:
    metrics = RecordingMetrics()
    with TestClient(make_fleet(metrics=metrics).app) as http:
        for stream in (False, True, False, True):
            http.post(CHAT_PATH, json=chat(stream=stream))
        http.post(CHAT_PATH, json=chat(model="nope"))
    assert len(metrics.finished) == 5
    assert_paired(metrics, dispatched=4)


async def _post_then_leave(
    app: FastAPI, body: dict[str, Any], leave_after_s: float
) -> list[Message]:
    sent = await post_then_leave(app, CHAT_PATH, body, leave_after_s)
    await asyncio.sleep(0.1)  # anything late (a second finish) would land by now
    return sent


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_that_leaves_is_finished_once_as_499(stream: bool) -> None:
    metrics = RecordingMetrics()
    fleet = make_fleet(token_delay_s=0.05, metrics=metrics)
    long_answer = chat("count with me", max_tokens=MAX_TOKENS_LIMIT, ignore_eos=True, stream=stream)
    asyncio.run(_post_then_leave(fleet.app, long_answer, leave_after_s=0.3))
    assert_paired(metrics, dispatched=1)
    [record] = metrics.finished
    assert (record.status, record.disconnected, record.stream) == (499, True, stream)
    if stream:  # no usage chunk came: the frames relayed before the client left count
        assert record.completion_tokens is not None and record.completion_tokens > 0


def test_a_client_that_leaves_while_queued_is_finished_once_and_never_dispatched() -> None:
    status, metrics = FakeStatusSource(), RecordingMetrics()
    status.set(CHAT_MODEL, "loading")
    policy = {CHAT_MODEL: queue_policy(queue_timeout_s=30.0)}
    fleet = make_fleet(status=status, metrics=metrics, model_fields=policy)
    started = time.monotonic()
    sent = asyncio.run(_post_then_leave(fleet.app, chat(), leave_after_s=0.2))
    assert time.monotonic() - started < 5.0  # not the 30 s queue timeout
    assert [m["status"] for m in sent if m["type"] == "http.response.start"] == [499]
    assert metrics.dispatched == []
    [record] = metrics.finished
    assert (record.status, record.disconnected, record.model) == (499, True, CHAT_MODEL)


# --- the access log ------------------------------------------------------------------------

ACCESS_FIELDS = (
    "request_id",
    "model",
    "endpoint",
    "status",
    "prompt_tokens",
    "completion_tokens",
    "latency_ms",
)


def access_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "llm_fleet.access"]


@pytest.mark.parametrize("stream", [False, True])
def test_one_access_line_per_request_without_prompt_or_answer(
    caplog: pytest.LogCaptureFixture, stream: bool
) -> None:
    marker = "zebra-7f3c-secret-marker"
    caplog.set_level(logging.INFO, logger="llm_fleet.access")
    headers = {"X-Request-Id": "access-1"}
    metrics = RecordingMetrics()
    with TestClient(make_fleet(metrics=metrics, token_delay_s=0.01).app) as http:
        response = http.post(
            CHAT_PATH, json=chat(f"tell {marker} back", stream=stream), headers=headers
        )
    assert marker in response.text  # the fake echoes it: the answer carries it too
    [record] = access_records(caplog)
    fields = {key: vars(record)[key] for key in ACCESS_FIELDS}  # the extra fields
    assert fields["request_id"] == "access-1"
    assert (fields["model"], fields["endpoint"], fields["status"]) == (CHAT_MODEL, "chat", 200)
    assert (fields["prompt_tokens"], fields["completion_tokens"]) == (3, 3)
    [finished] = metrics.finished  # the line is the finished record's, not a second clock
    assert fields["latency_ms"] == round(finished.latency_s * 1000, 1)
    assert fields["latency_ms"] >= 3 * 10 * 0.9  # three tokens, 10 ms each
    assert vars(record)["stream"] is stream

    line = JSONFormatter().format(record)
    parsed = json.loads(line)
    assert {key: parsed[key] for key in ACCESS_FIELDS} == fields
    assert parsed["levelname"] == "INFO"
    assert marker not in line
    assert marker not in record.getMessage()


def test_refused_requests_are_logged_once_each(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="llm_fleet.access")
    with TestClient(make_fleet().app) as http:
        http.post(CHAT_PATH, json=chat(model="gpt-17"), headers={"X-Request-Id": "r-404"})
        http.post(CHAT_PATH, json=chat(max_tokens=10_000), headers={"X-Request-Id": "r-400"})
        http.post(CHAT_PATH, json=chat(), headers={"X-Request-Id": "r-200"})
    records = access_records(caplog)
    logged = {vars(r)["request_id"]: vars(r) for r in records}
    assert len(records) == 3
    assert {rid: fields["status"] for rid, fields in logged.items()} == {
        "r-404": 404,
        "r-400": 400,
        "r-200": 200,
    }
    assert logged["r-404"]["model"] == "unknown"
    assert logged["r-400"]["error_code"] == "max_tokens_exceeded"
