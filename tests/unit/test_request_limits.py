"""What one request may ask: caps on the fields that multiply work, message roles, the
Content-Type policy and the header size limit, each refused in the OpenAI shape before
any engine sees the request."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from llm_fleet.deployments.config import RequestLimits
from tests.fakes import COMPLETIONS_MODEL, RecordingMetrics, make_fleet
from tests.unit.ops_helpers import CHAT_PATH, COMPLETIONS_PATH, chat, openai_error

DEFAULTS = RequestLimits()
MESSAGE = {"role": "user", "content": "hi"}
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}


@pytest.fixture
def metrics() -> RecordingMetrics:
    return RecordingMetrics()


@pytest.fixture
def http(metrics: RecordingMetrics) -> Iterator[TestClient]:
    with TestClient(make_fleet(metrics=metrics).app) as client:
        yield client


def completion(**fields: Any) -> dict[str, Any]:
    return {"model": COMPLETIONS_MODEL, "prompt": "one two", "max_tokens": 2, **fields}


# (path, body over a cap, the param named, the setting named)
OVER_A_CAP = [
    (CHAT_PATH, chat(n=1000), "n", "max_n"),
    (CHAT_PATH, chat(best_of=DEFAULTS.max_n + 1), "best_of", "max_n"),
    (COMPLETIONS_PATH, completion(n=DEFAULTS.max_n + 1), "n", "max_n"),
    (COMPLETIONS_PATH, completion(best_of=1000), "best_of", "max_n"),
    (CHAT_PATH, chat(logprobs=True, top_logprobs=1000), "top_logprobs", "max_logprobs"),
    (COMPLETIONS_PATH, completion(logprobs=DEFAULTS.max_logprobs + 1), "logprobs", "max_logprobs"),
    (CHAT_PATH, chat(stop=["x"] * 17), "stop", "max_stop_sequences"),
    (COMPLETIONS_PATH, completion(stop="y" * 257), "stop", "max_stop_length"),
    (CHAT_PATH, {**chat(), "messages": [MESSAGE] * 2049}, "messages", "max_messages"),
    (CHAT_PATH, chat(tools=[TOOL] * 129), "tools", "max_tools"),
    (COMPLETIONS_PATH, completion(prompt=["a"] * 17), "prompt", "max_prompts"),
    (COMPLETIONS_PATH, completion(prompt=[[1, 2]] * 17), "prompt", "max_prompts"),
]


@pytest.mark.parametrize(("path", "body", "param", "setting"), OVER_A_CAP)
def test_a_field_over_its_cap_is_a_400_naming_it(
    http: TestClient, metrics: RecordingMetrics, path: str, body: Any, param: str, setting: str
) -> None:
    error = openai_error(http.post(path, json=body), 400, "request_limit_exceeded")
    assert error["param"] == param
    assert f"(limits.{setting})" in error["message"]
    [record] = metrics.finished
    assert record.rejection == "limits" and metrics.dispatched == []


@pytest.mark.parametrize(
    ("path", "body"),
    [
        (CHAT_PATH, chat(n=DEFAULTS.max_n, max_tokens=2)),
        (CHAT_PATH, chat(stop=["x"] * 16, logprobs=True, top_logprobs=20, max_tokens=2)),
        (COMPLETIONS_PATH, completion(prompt=["a"] * 16)),
        (COMPLETIONS_PATH, completion(prompt=list(range(1, 40)))),  # one prompt of token ids
    ],
)
def test_at_the_cap_reaches_the_engine(
    http: TestClient, metrics: RecordingMetrics, path: str, body: Any
) -> None:
    http.post(path, json=body)  # the fake engine itself serves n=1 and one prompt only
    assert len(metrics.dispatched) == 1


def test_the_caps_are_per_model_config() -> None:
    metrics = RecordingMetrics()
    fleet = make_fleet(model_fields={COMPLETIONS_MODEL: {"limits": {"max_n": 2}}}, metrics=metrics)
    with TestClient(fleet.app) as http:
        error = openai_error(
            http.post(COMPLETIONS_PATH, json=completion(n=3)), 400, "request_limit_exceeded"
        )
        assert "limit of 2 (limits.max_n)" in error["message"]
        http.post(COMPLETIONS_PATH, json=completion(n=2))
        assert len(metrics.dispatched) == 1


@pytest.mark.parametrize(
    ("message", "said"),
    [
        ({"role": "banana", "content": "hi"}, "Invalid value for 'messages[1].role': 'banana'"),
        ({"role": 7, "content": "hi"}, "Invalid value for 'messages[1].role': <invalid>"),
        ({"content": "hi"}, "Missing required parameter: 'messages[1].role'"),
    ],
)
def test_a_message_role_must_be_one_of_openais(
    http: TestClient, message: dict[str, Any], said: str
) -> None:
    body = {**chat(), "messages": [MESSAGE, message]}
    error = openai_error(http.post(CHAT_PATH, json=body), 400, "invalid_value")
    assert error["param"] == "messages[1].role"
    assert error["message"].startswith(said)


@pytest.mark.parametrize("role", ["system", "developer", "user", "assistant"])
def test_every_openai_role_is_accepted(http: TestClient, role: str) -> None:
    body = {**chat(), "messages": [{"role": role, "content": "hi"}, MESSAGE], "max_tokens": 2}
    assert http.post(CHAT_PATH, json=body).status_code == 200


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded"])
def test_a_body_not_declared_json_is_a_415(http: TestClient, content_type: str) -> None:
    import json

    raw = json.dumps(chat(max_tokens=2))
    response = http.post(CHAT_PATH, content=raw, headers={"Content-Type": content_type})
    error = openai_error(response, 415, "unsupported_media_type")
    assert "Content-Type: application/json" in error["message"]


@pytest.mark.parametrize(
    "content_type",
    [None, "application/json", "application/json; charset=utf-8", "application/vnd.api+json"],
)
def test_json_or_no_declared_type_is_read(http: TestClient, content_type: str | None) -> None:
    import json

    raw = json.dumps(chat(max_tokens=2)).encode()
    headers = {} if content_type is None else {"Content-Type": content_type}
    request = http.build_request("POST", CHAT_PATH, content=raw, headers=headers)
    assert request.headers.get("content-type") == content_type
    assert http.send(request).status_code == 200


def test_oversized_headers_are_a_431_on_every_route() -> None:
    fleet = make_fleet(max_header_bytes=4096)
    with TestClient(fleet.app) as http:
        big = {"X-Padding": "p" * 5000}
        for response in (
            http.post(CHAT_PATH, json=chat(), headers=big),
            http.get("/v1/models", headers=big),
        ):
            error = openai_error(response, 431, "request_header_fields_too_large")
            assert "over the limit of 4096" in error["message"]
        assert http.get("/v1/models", headers={"X-Padding": "p" * 3000}).status_code == 200
