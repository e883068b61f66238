"""The LLM Inference API surface (``/api/*``) through the router, on real Ray Serve and
real vLLM (CPU): each endpoint answers (SmolLM2 says "Paris"), streams in its SSE
framing, and fails in the OpenAI shape with a request id, as ``/v1`` does."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from tests.serve.conftest import CHAT_MODEL, COMPLETION_MODEL, Fleet

pytestmark = [pytest.mark.serve, pytest.mark.slow]

QUESTION = "What is the capital of France?"
CHAT = {
    "model": CHAT_MODEL,
    "messages": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": QUESTION},
    ],
    "temperature": 0,
    "max_tokens": 30,
}
GENERATE = {"model": CHAT_MODEL, "prompt": QUESTION, "temperature": 0, "max_tokens": 30}


def _post(fleet: Fleet, path: str, body: Any, **options: Any) -> httpx.Response:
    return httpx.post(f"{fleet.base_url}{path}", json=body, timeout=120, **options)


def _frames(response: httpx.Response) -> list[dict[str, Any]]:
    """The JSON events of an /api stream, after checking its framing and [DONE] end."""
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["x-request-id"]
    frames = response.text.split("\n\n")
    assert frames[-2:] == ["data: [DONE]", ""], response.text[-300:]
    assert all(frame.startswith("data: ") for frame in frames[:-1]), frames
    return [json.loads(frame.removeprefix("data: ")) for frame in frames[:-2]]


@pytest.mark.parametrize(("path", "body"), [("/api/generate", GENERATE), ("/api/chat", CHAT)])
def test_whole_answers_say_paris(fleet: Fleet, path: str, body: dict[str, Any]) -> None:
    response = _post(fleet, path, body)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert "Paris" in answer["text"], answer
    assert answer["model"] == CHAT_MODEL
    assert answer["finish_reason"] in ("stop", "length")
    assert answer["usage"]["completion_tokens"] > 0
    assert response.headers["x-request-id"]
    if path == "/api/chat":
        assert answer["message"] == {"role": "assistant", "content": answer["text"]}


@pytest.mark.parametrize(
    ("path", "body"), [("/api/generate/stream", GENERATE), ("/api/chat/stream", CHAT)]
)
def test_streams_say_paris_in_text_deltas(fleet: Fleet, path: str, body: dict[str, Any]) -> None:
    *deltas, done = _frames(_post(fleet, path, body))
    assert len(deltas) > 1, "streamed in pieces"
    assert all(set(event) == {"text"} for event in deltas), deltas
    assert "Paris" in "".join(event["text"] for event in deltas)
    assert done["done"] is True and done["model"] == CHAT_MODEL
    assert done["finish_reason"] in ("stop", "length")
    assert done["usage"]["completion_tokens"] > 0


def test_generate_on_the_base_model_continues_the_prompt(fleet: Fleet) -> None:
    body = {"model": COMPLETION_MODEL, "prompt": "The capital of France is", "max_tokens": 12}
    answer = _post(fleet, "/api/generate", {**body, "temperature": 0}).json()
    assert any(word in answer["text"] for word in ("Paris", "France", "capital")), answer


def test_llms_lists_the_models_with_their_state(fleet: Fleet) -> None:
    listed = {m["id"]: m for m in httpx.get(f"{fleet.base_url}/api/llms").json()["models"]}
    assert listed[CHAT_MODEL]["state"] == "ready"
    assert listed[CHAT_MODEL]["replicas"]["running"] >= 1
    assert listed[COMPLETION_MODEL]["generate_route"] == "completions"


def _error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error: dict[str, Any] = response.json()["error"]
    assert error["code"] == code, error
    assert error["request_id"] == response.headers["x-request-id"]
    return error


@pytest.mark.parametrize(
    "path", ["/api/generate", "/api/generate/stream", "/api/chat", "/api/chat/stream"]
)
def test_errors_are_openai_shaped(fleet: Fleet, path: str) -> None:
    body = {**GENERATE, **CHAT}
    _error(_post(fleet, path, {**body, "model": "no-such-model"}), 404, "model_not_found")
    broken = httpx.post(
        f"{fleet.base_url}{path}",
        content=b'{"model": ',
        headers={"Content-Type": "application/json"},
        timeout=30,
    )
    _error(broken, 400, "invalid_json")
    error = _error(_post(fleet, path, {**body, "max_tokens": 100_000}), 400, "max_tokens_exceeded")
    assert "1024" in error["message"]  # the model's max_tokens_limit, named
