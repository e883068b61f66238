"""Helpers shared by the router operations unit tests."""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING, Any

from tests.fakes import (
    CHAT_MODEL,
    COMPLETIONS_MODEL,
)

if TYPE_CHECKING:
    import httpx2  # what starlette's TestClient is built on

CHAT_PATH = "/v1/chat/completions"
COMPLETIONS_PATH = "/v1/completions"
SERVER_TIMING_ENTRY = re.compile(r"^(?P<name>[a-z]+);dur=(?P<ms>\d+(?:\.\d+)?)$")


def chat(text: str = "alpha beta gamma", **fields: Any) -> dict[str, Any]:
    return {"model": CHAT_MODEL, "messages": [{"role": "user", "content": text}], **fields}


def request_for(
    route: str, text: str = "one two three", **fields: Any
) -> tuple[str, dict[str, Any]]:
    if route == "chat":
        return CHAT_PATH, chat(text, **fields)
    return COMPLETIONS_PATH, {"model": COMPLETIONS_MODEL, "prompt": text, **fields}


def sse_payloads(response: httpx2.Response) -> list[dict[str, Any]]:
    """The JSON chunks of a whole SSE body that ends with [DONE]."""
    frames = response.text.split("\n\n")
    assert frames[-2:] == ["data: [DONE]", ""], response.text[-200:]
    return [json.loads(frame.removeprefix("data: ")) for frame in frames[:-2]]


def openai_error(response: httpx2.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}, body
    error: dict[str, Any] = body["error"]
    assert set(error) == {"message", "type", "param", "code", "request_id"}, error
    assert error["code"] == code, error
    assert error["request_id"] == response.headers["x-request-id"]
    return error


def server_timing(response: httpx2.Response) -> dict[str, float]:
    """Server-Timing as {name: milliseconds}, after checking every entry's syntax."""
    timings: dict[str, float] = {}
    for entry in response.headers["server-timing"].split(", "):
        match = SERVER_TIMING_ENTRY.match(entry)
        assert match is not None, entry
        timings[match["name"]] = float(match["ms"])
    return timings


def queue_policy(*, retry_after_s: int = 15, queue_timeout_s: float = 300.0) -> dict[str, Any]:
    unavailable = {
        "action": "queue",
        "retry_after_s": retry_after_s,
        "queue_timeout_s": queue_timeout_s,
    }
    return {"unavailable": unavailable}
