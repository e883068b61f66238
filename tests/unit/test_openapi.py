"""``/openapi.json``: a valid OpenAPI 3.1 document that describes every public route,
and whose schemas hold for what the gateway really answers (the fake engine behind the
real router and replica code)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from jsonschema import Draft202012Validator
from openapi_spec_validator import validate

from llm_fleet.router.auth import KeyRing
from llm_fleet.router.keys_file import create_key
from llm_fleet.router.openapi_operations import OPERATIONS
from tests.fakes import CHAT_MODEL, COMPLETIONS_MODEL, make_fleet

CHAT = {"model": CHAT_MODEL, "messages": [{"role": "user", "content": "hi there"}]}
COMPLETION = {"model": COMPLETIONS_MODEL, "prompt": "once upon a time", "max_tokens": 4}


async def _metrics_text() -> str:
    return "fake_metric 1\n"


@pytest.fixture(scope="module")
def http() -> TestClient:
    return TestClient(make_fleet(metrics_text=_metrics_text).app)


@pytest.fixture(scope="module")
def document(http: TestClient) -> dict[str, Any]:
    answer = http.get("/openapi.json")
    assert answer.status_code == 200
    return dict(answer.json())


def answer_schema(document: dict[str, Any], operation: str, status: int, media: str) -> Any:
    """A validator for the body the document says ``operation`` answers with ``status``."""
    method, path = operation.split(" ", 1)
    content = document["paths"][path][method.lower()]["responses"][str(status)]["content"]
    root = {**content[media]["schema"], "components": document["components"]}
    return Draft202012Validator(root)


def sse_data(text: str) -> list[Any]:
    lines = [line.removeprefix("data: ") for line in text.splitlines() if line.startswith("data:")]
    assert lines[-1] == "[DONE]", text
    return [json.loads(line) for line in lines[:-1]]


def test_the_document_is_valid_openapi_3_1(document: dict[str, Any]) -> None:
    assert document["openapi"].startswith("3.1")
    validate(document)  # raises on an invalid document


def test_every_public_route_has_an_entry(http: TestClient, document: dict[str, Any]) -> None:
    routes = {
        f"{method} {route.path_format}"
        for route in http.app.routes  # type: ignore[attr-defined]
        if isinstance(route, APIRoute) and route.include_in_schema
        for method in route.methods
    }
    assert routes == set(OPERATIONS)
    documented = {
        f"{method.upper()} {path}" for path, item in document["paths"].items() for method in item
    }
    assert documented == routes


def test_every_operation_documents_its_bodies(document: dict[str, Any]) -> None:
    for path, item in document["paths"].items():
        for method, operation in item.items():
            responses = operation["responses"]
            assert "422" not in responses, (method, path)  # the gateway answers 400
            assert "200" in responses and responses["200"]["content"], (method, path)
            for answer in responses.values():
                assert all("schema" in media for media in answer["content"].values())
            if method == "post":
                body = operation["requestBody"]["content"]["application/json"]["schema"]
                assert body["$ref"].startswith("#/components/schemas/")


def test_answers_hold_to_their_schemas(http: TestClient, document: dict[str, Any]) -> None:
    chat = http.post("/v1/chat/completions", json=CHAT)
    completion = http.post("/v1/completions", json=COMPLETION)
    answers = {
        "POST /v1/chat/completions": chat,
        "POST /v1/completions": completion,
        "GET /v1/models": http.get("/v1/models"),
        "GET /v1/models/{model_id}": http.get(f"/v1/models/{CHAT_MODEL}"),
        "GET /health/live": http.get("/health/live"),
    }
    for operation, answer in answers.items():
        assert answer.status_code == 200, (operation, answer.text)
        answer_schema(document, operation, 200, "application/json").validate(answer.json())
    assert chat.json()["choices"][0]["message"]["content"]
    ready = http.get("/health/ready")  # no status read yet in the fake: 503
    status = ready.status_code
    answer_schema(document, "GET /health/ready", status, "application/json").validate(ready.json())
    metrics = http.get("/metrics")
    assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
    assert "text/plain" in document["paths"]["/metrics"]["get"]["responses"]["200"]["content"]


@pytest.mark.parametrize(
    ("operation", "body", "chunk"),
    [
        ("POST /v1/chat/completions", CHAT, "ChatCompletionChunk"),
        ("POST /v1/completions", COMPLETION, "CompletionChunk"),
    ],
)
def test_stream_chunks_hold_to_their_schema(
    http: TestClient, document: dict[str, Any], operation: str, body: dict[str, Any], chunk: str
) -> None:
    streamed = {**body, "stream": True, "stream_options": {"include_usage": True}}
    answer = http.post(operation.split(" ", 1)[1], json=streamed)
    assert answer.headers["content-type"].startswith("text/event-stream")
    assert "text/event-stream" in answer_content(document, operation)
    check = Draft202012Validator(
        {"$ref": f"#/components/schemas/{chunk}", "components": document["components"]}
    )
    chunks = sse_data(answer.text)
    assert len(chunks) >= 2
    for data in chunks:
        check.validate(data)
    assert chunks[-1]["usage"]["total_tokens"] > 0


def answer_content(document: dict[str, Any], operation: str) -> dict[str, Any]:
    method, path = operation.split(" ", 1)
    return dict(document["paths"][path][method.lower()]["responses"]["200"]["content"])


@pytest.mark.parametrize(
    ("operation", "status", "send"),
    [
        ("POST /v1/completions", 404, {"model": "no-such-model", "prompt": "hi"}),
        ("POST /v1/completions", 400, {"model": COMPLETIONS_MODEL, "prompt": "hi", "n": 0}),
        ("POST /v1/chat/completions", 400, {"model": CHAT_MODEL}),
        ("POST /v1/chat/completions", 415, None),
    ],
)
def test_refusals_hold_to_the_error_schema(
    http: TestClient, document: dict[str, Any], operation: str, status: int, send: Any
) -> None:
    path = operation.split(" ", 1)[1]
    if send is None:
        answer = http.post(path, content=b"hi", headers={"content-type": "text/plain"})
    else:
        answer = http.post(path, json=send)
    assert answer.status_code == status, answer.text
    answer_schema(document, operation, status, "application/json").validate(answer.json())


def test_with_keys_every_keyed_route_needs_the_bearer_key(tmp_path: Path) -> None:
    key = create_key(tmp_path / "keys.yaml", "all")
    app = make_fleet(keys=KeyRing.from_file(tmp_path / "keys.yaml")).app
    http = TestClient(app)
    document = http.get("/openapi.json").json()  # no key needed
    scheme = document["components"]["securitySchemes"]["apiKey"]
    assert scheme["type"] == "http" and scheme["scheme"] == "bearer"
    for path, item in document["paths"].items():
        for operation in item.values():
            if path.startswith("/health/"):
                assert "security" not in operation
                continue
            assert operation["security"] == [{"apiKey": []}], path
            assert "401" in operation["responses"], path
    refused = http.get("/v1/models")
    assert refused.status_code == 401
    answer_schema(document, "GET /v1/models", 401, "application/json").validate(refused.json())
    allowed = http.get("/v1/models", headers={"Authorization": f"Bearer {key}"})
    answer_schema(document, "GET /v1/models", 200, "application/json").validate(allowed.json())


def test_without_keys_the_key_is_optional(document: dict[str, Any]) -> None:
    security = document["paths"]["/v1/models"]["get"]["security"]
    assert security == [{}, {"apiKey": []}]


def test_fastapis_cdn_pages_are_off(http: TestClient) -> None:
    for path in ("/docs", "/redoc", "/docs/oauth2-redirect"):
        assert http.get(path).status_code == 404, path
