"""The LLM Inference API surface (``router/inference_api.py``) on the router's pipeline,
over the fake engine: its bodies, its streams, and the same errors, limits and
accounting as ``/v1`` (``tests/serve/test_inference_api.py`` runs it on the real fleet)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest
from fastapi.testclient import TestClient

from tests.fakes import (
    CHAT_MODEL,
    COMPLETIONS_MODEL,
    MAX_TOKENS_LIMIT,
    NOT_ALLOWED_MODEL,
    FakeStatusSource,
    RecordingMetrics,
    make_fleet,
)

if TYPE_CHECKING:
    import httpx2


@pytest.fixture
def metrics() -> RecordingMetrics:
    return RecordingMetrics()


@pytest.fixture
def http(metrics: RecordingMetrics) -> Iterator[TestClient]:
    fields = {COMPLETIONS_MODEL: {"generate_route": "completions"}}
    with TestClient(make_fleet(metrics=metrics, model_fields=fields).app) as client:
        yield client


def api_frames(response: httpx2.Response) -> list[dict[str, Any]]:
    """The JSON events of an /api stream, after checking its framing and [DONE] end."""
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    frames = response.text.split("\n\n")
    assert frames[-1] == "" and frames[-2] == "data: [DONE]", response.text[-200:]
    assert all(frame.startswith("data: ") for frame in frames[:-1]), frames
    return [json.loads(frame.removeprefix("data: ")) for frame in frames[:-2]]


def test_generate_answers_text_usage_and_finish_reason(
    http: TestClient, metrics: RecordingMetrics
) -> None:
    body = {"model": CHAT_MODEL, "prompt": "the capital is Paris", "max_tokens": 10}
    response = http.post("/api/generate", json=body)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["text"] == "the capital is Paris"
    assert answer["model"] == CHAT_MODEL
    assert answer["finish_reason"] == "stop"
    assert answer["usage"]["completion_tokens"] == 4
    assert "choices" not in answer and "message" not in answer
    assert response.headers["x-request-id"]
    # On a chat model the prompt went through the chat route, as one user message.
    assert [r.endpoint for r in metrics.finished] == ["chat"]


def test_generate_on_a_base_model_continues_the_raw_prompt(
    http: TestClient, metrics: RecordingMetrics
) -> None:
    body = {"model": COMPLETIONS_MODEL, "prompt": "one two three", "max_tokens": 3}
    answer = http.post("/api/generate", json=body).json()
    assert answer["text"] == "one two three"
    assert answer["finish_reason"] in ("stop", "length")
    assert [r.endpoint for r in metrics.finished] == ["completions"]


def test_chat_answers_the_message_and_its_text(http: TestClient) -> None:
    body = {
        "model": CHAT_MODEL,
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Hello there"},
        ],
    }
    answer = http.post("/api/chat", json=body).json()
    assert answer["message"] == {"role": "assistant", "content": "Hello there"}
    assert answer["text"] == "Hello there"
    assert answer["usage"]["prompt_tokens"] == 7


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/api/generate/stream", {"model": CHAT_MODEL, "prompt": "a b c d"}),
        (
            "/api/chat/stream",
            {"model": CHAT_MODEL, "messages": [{"role": "user", "content": "a b c d"}]},
        ),
        (
            "/api/generate/stream",
            {"model": COMPLETIONS_MODEL, "prompt": "a b c d", "max_tokens": 4},
        ),
    ],
)
def test_streams_send_text_deltas_then_a_done_frame(
    http: TestClient, path: str, body: dict[str, Any]
) -> None:
    # The body's own stream flag is the route's to decide: ignored.
    events = api_frames(http.post(path, json={**body, "stream": False}))
    *deltas, done = events
    assert "".join(event["text"] for event in deltas) == "a b c d"
    assert all(set(event) == {"text"} and event["text"] for event in deltas), deltas
    assert done["done"] is True and done["model"] == body["model"]
    assert done["finish_reason"] in ("stop", "length")
    assert done["usage"]["completion_tokens"] == 4


def test_llms_lists_the_models_the_caller_may_use_with_their_state() -> None:
    status = FakeStatusSource()
    status.set(CHAT_MODEL, "ready")
    status.set(COMPLETIONS_MODEL, "loading")
    fields = {COMPLETIONS_MODEL: {"generate_route": "completions"}}
    with TestClient(make_fleet(status=status, model_fields=fields).app) as http:
        listed = http.get("/api/llms").json()["models"]
    assert sorted(m["id"] for m in listed) == sorted([CHAT_MODEL, COMPLETIONS_MODEL])
    assert NOT_ALLOWED_MODEL not in {m["id"] for m in listed}
    by_id = {m["id"]: m for m in listed}
    assert by_id[CHAT_MODEL]["state"] == "ready"
    assert by_id[CHAT_MODEL]["replicas"]["running"] == 1
    assert by_id[COMPLETIONS_MODEL]["state"] == "loading"
    assert by_id[COMPLETIONS_MODEL]["generate_route"] == "completions"
    assert by_id[CHAT_MODEL]["max_tokens_limit"] == MAX_TOKENS_LIMIT


def openai_error(response: httpx2.Response, status: int, code: str | None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error: dict[str, Any] = response.json()["error"]
    assert error["request_id"] == response.headers["x-request-id"]
    assert error["code"] == code, error
    return error


@pytest.mark.parametrize("path", ["/api/generate", "/api/generate/stream", "/api/chat"])
def test_an_unknown_model_is_the_openai_404(http: TestClient, path: str) -> None:
    body = {"model": "nope", "prompt": "hi", "messages": [{"role": "user", "content": "hi"}]}
    openai_error(http.post(path, json=body), 404, "model_not_found")


def test_malformed_json_and_a_missing_prompt_are_400s(http: TestClient) -> None:
    broken = http.post(
        "/api/generate", content=b"{not json", headers={"Content-Type": "application/json"}
    )
    openai_error(broken, 400, "invalid_json")
    error = openai_error(
        http.post("/api/generate", json={"model": CHAT_MODEL}), 400, "invalid_value"
    )
    assert error["param"] == "prompt"
    error = openai_error(
        http.post("/api/generate", json={"model": CHAT_MODEL, "prompt": ["a"]}),
        400,
        "invalid_value",
    )
    assert error["param"] == "prompt"
    openai_error(http.post("/api/chat", json={"model": CHAT_MODEL}), 400, "invalid_value")


def test_over_the_token_limit_is_the_same_400_as_on_v1(http: TestClient) -> None:
    body = {"model": CHAT_MODEL, "prompt": "hi", "max_tokens": MAX_TOKENS_LIMIT + 1}
    api = openai_error(http.post("/api/generate", json=body), 400, "max_tokens_exceeded")
    v1 = http.post(
        "/v1/chat/completions",
        json={
            "model": CHAT_MODEL,
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": MAX_TOKENS_LIMIT + 1,
        },
    ).json()["error"]
    assert api["message"] == v1["message"]


def test_limits_on_fields_that_multiply_work_apply(http: TestClient) -> None:
    body = {"model": CHAT_MODEL, "messages": [{"role": "user", "content": "hi"}], "n": 1000}
    openai_error(http.post("/api/chat/stream", json=body), 400, "request_limit_exceeded")


# --- sampling defaults (LLM_DEFAULT_TEMPERATURE / LLM_DEFAULT_TOP_P, sampling.*) --------------


def test_sampling_defaults_fill_what_a_request_leaves_out_on_every_route() -> None:
    fields = {CHAT_MODEL: {"sampling": {"temperature": 0.3, "top_p": 0.9}}}
    fleet = make_fleet(model_fields=fields)
    with TestClient(fleet.app) as http:
        http.post("/api/generate", json={"model": CHAT_MODEL, "prompt": "a"})
        http.post(
            "/v1/chat/completions",
            json={"model": CHAT_MODEL, "messages": [{"role": "user", "content": "a"}]},
        )
        http.post(
            "/api/chat",
            json={
                "model": CHAT_MODEL,
                "messages": [{"role": "user", "content": "a"}],
                "temperature": 1.5,
            },
        )
        http.post(
            "/v1/chat/completions",
            json={
                "model": CHAT_MODEL,
                "messages": [{"role": "user", "content": "a"}],
                "temperature": 0,
                "top_p": None,
            },
        )
        http.post("/v1/completions", json={"model": COMPLETIONS_MODEL, "prompt": "a"})
    seen = [(b.get("temperature"), b.get("top_p")) for b in fleet.engines[CHAT_MODEL].bodies]
    # The client's own value stays, 0 included; an explicit null is "none sent".
    assert seen == [(0.3, 0.9), (0.3, 0.9), (1.5, 0.9), (0, 0.9)]
    other = fleet.engines[COMPLETIONS_MODEL].bodies[0]
    assert "temperature" not in other and "top_p" not in other  # vLLM's default
