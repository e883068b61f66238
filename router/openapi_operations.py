"""What ``/openapi.json`` says of each route: ``OPERATIONS`` has one ``Operation`` per
public route, keyed ``"METHOD /path"`` as FastAPI writes the path (``{model_id}``).

A new route is one entry here (its body shapes in ``router/openapi_schema.py``);
``tests/unit/test_openapi.py`` fails for a route without one, and validates the
document as OpenAPI 3.1. ``describe_api`` lays the entries over the document FastAPI
generates: the summary, the JSON body, every answer (the success shapes, and the
OpenAI error body for each refusal the route can give) and the API key, as the bearer
scheme ``apiKey`` (Swagger UI's Authorize button).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI

from llm_fleet.router.openapi_schema import SCHEMAS, Schema, ref

# Why each refusal happens: the description of the error answers an Operation lists.
ERRORS: dict[int, str] = {
    400: "invalid request, or a limit on it exceeded",
    401: "no valid API key (when the gateway has keys)",
    404: "unknown model, or one the key may not use",
    413: "request body too large",
    415: "not a JSON body",
    429: "the API key's quota, or the gateway's max_concurrent_requests, reached (Retry-After)",
    431: "request headers too large (router.max_header_bytes)",
    503: "the model not ready, at capacity, or its engine restarting (Retry-After)",
    504: "the request took longer than router.request_timeout_s",
}
INFERENCE_ERRORS = (400, 404, 413, 415, 429, 503, 504)

DESCRIPTION = (
    "llm-fleet's OpenAI-compatible gateway: chat and text completions (JSON, or "
    "server-sent events with `stream: true`), the models an API key may use, health "
    "and metrics. With API keys (router.keys_file), Authorize with one before Try it out."
)

BEARER: Schema = {
    "type": "http",
    "scheme": "bearer",
    "description": "An API key of router.keys_file, sent as `Authorization: Bearer <key>`. "
    "Without a keys file the gateway needs none.",
}


def json_answer(description: str, schema: str) -> dict[str, Any]:
    """A JSON answer whose body is the component schema ``schema``."""
    return {"description": description, "content": {"application/json": {"schema": ref(schema)}}}


def json_or_stream(whole: str, chunk: str) -> dict[str, Any]:
    """The 200 of an inference route: the ``whole`` answer, or with ``stream: true``
    server-sent events, each one's data a ``chunk`` as JSON."""
    events = (
        f"Server-sent events: each `data:` line is a {chunk} as JSON, the last one "
        "`data: [DONE]`. A failure mid-stream is one more event whose data is an Error "
        "(the OpenAI error body), then `data: [DONE]`."
    )
    return {
        "description": f"a {whole}, or with `stream: true` a stream of {chunk}s",
        "content": {
            "application/json": {"schema": ref(whole)},
            "text/event-stream": {"schema": {"type": "string", "description": events}},
        },
    }


def api_stream() -> dict[str, Any]:
    """The 200 of an ``/api/*/stream`` route: server-sent events of ApiStreamEvent."""
    events = (
        'Server-sent events: `data: {"text": ...}` for each piece of the answer, then '
        '`data: {"done": true, "finish_reason", "usage"}`, then `data: [DONE]` '
        "(each data an ApiStreamEvent). A failure mid-stream is one event whose data is an "
        "Error (the OpenAI error body), then `data: [DONE]`."
    )
    return {
        "description": "a stream of ApiStreamEvents",
        "content": {"text/event-stream": {"schema": {"type": "string", "description": events}}},
    }


@dataclass(frozen=True)
class Operation:
    """One route in ``/openapi.json``.

    ``answers``: its answers other than refusals, by status; ``errors``: the statuses
    it refuses with the OpenAI error body (431 and, for a keyed route, 401 come with
    every route); ``request``: the component schema of its JSON body, if it reads one;
    ``keyed``: needs an API key when the gateway has keys.
    """

    summary: str
    tag: str
    answers: Mapping[int, dict[str, Any]]
    errors: tuple[int, ...] = ()
    request: str | None = None
    keyed: bool = True
    description: str | None = None

    def openapi(self, *, keys_required: bool) -> dict[str, Any]:
        """The OpenAPI operation fields this entry sets."""
        refusals = sorted({*self.errors, 431, *((401,) if self.keyed else ())})
        responses = {str(status): answer for status, answer in self.answers.items()}
        for status in refusals:
            responses[str(status)] = json_answer(ERRORS[status], "Error")
        fields: dict[str, Any] = {"summary": self.summary, "tags": [self.tag]}
        fields["responses"] = responses
        if self.description is not None:
            fields["description"] = self.description
        if self.request is not None:
            body = {"application/json": {"schema": ref(self.request)}}
            fields["requestBody"] = {"required": True, "content": body}
        if self.keyed:
            # Without keys the gateway takes any or none: the empty requirement says so.
            key: dict[str, list[str]] = {"apiKey": []}
            fields["security"] = [key] if keys_required else [{}, key]
        return fields


_OPENAI = "OpenAI"
_INFERENCE_API = "LLM Inference API"
_HEALTH = "Health"
_OPERATIONS = "Operations"

OPERATIONS: dict[str, Operation] = {
    "POST /v1/chat/completions": Operation(
        "Create a chat completion",
        _OPENAI,
        {200: json_or_stream("ChatCompletion", "ChatCompletionChunk")},
        INFERENCE_ERRORS,
        request="ChatCompletionRequest",
    ),
    "POST /v1/completions": Operation(
        "Create a text completion",
        _OPENAI,
        {200: json_or_stream("Completion", "CompletionChunk")},
        INFERENCE_ERRORS,
        request="CompletionRequest",
    ),
    "GET /v1/models": Operation(
        "List the models the API key may use",
        _OPENAI,
        {200: json_answer("the models", "ModelList")},
    ),
    "GET /v1/models/{model_id}": Operation(
        "One model the API key may use",
        _OPENAI,
        {200: json_answer("the model", "Model")},
        (404,),
    ),
    "GET /health/live": Operation(
        "Liveness, and each model's state",
        _HEALTH,
        {200: json_answer("the gateway answers", "Health")},
        keyed=False,
    ),
    "GET /health/ready": Operation(
        "Readiness: every model with min_replicas > 0 has a running replica",
        _HEALTH,
        {
            200: json_answer("ready", "Health"),
            503: json_answer("not ready, or draining before a shutdown", "Health"),
        },
        keyed=False,
    ),
    **{
        f"POST /api/{kind}{suffix}": Operation(
            f"{what}{streamed} (the LLM Inference API)",
            _INFERENCE_API,
            {200: api_stream() if suffix else json_answer("the answer", "ApiAnswer")},
            INFERENCE_ERRORS,
            request=request,
        )
        for kind, what, request in (
            ("generate", "Generate text from a prompt", "ApiGenerateRequest"),
            ("chat", "Chat with a message history", "ChatCompletionRequest"),
        )
        for suffix, streamed in (("", ""), ("/stream", ", streamed"))
    },
    "GET /api/llms": Operation(
        "The models the API key may use, with their state (the LLM Inference API)",
        _INFERENCE_API,
        {200: json_answer("the models", "LlmList")},
    ),
    "GET /metrics": Operation(
        "Prometheus metrics",
        _OPERATIONS,
        {
            200: {
                "description": "the Prometheus text exposition format 0.0.4",
                "content": {"text/plain": {"schema": {"type": "string"}}},
            }
        },
        description="Served when router.expose_metrics is on.",
    ),
}


def describe_api(app: FastAPI, *, keys_required: bool) -> None:
    """Make ``app``'s ``/openapi.json`` the document FastAPI generates with each route's
    ``OPERATIONS`` entry laid over it; ``keys_required``: the gateway has API keys."""
    generate = app.openapi  # FastAPI's: builds the document once, keeps it on the app

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            describe(generate(), keys_required=keys_required)
        assert app.openapi_schema is not None
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def describe(document: dict[str, Any], *, keys_required: bool) -> dict[str, Any]:
    """``document`` (FastAPI's, changed in place) with the ``OPERATIONS`` entries of
    its routes, the component schemas and the bearer scheme."""
    for path, item in document.get("paths", {}).items():
        for method, operation in item.items():
            entry = OPERATIONS.get(f"{method.upper()} {path}")
            if entry is not None:
                operation.update(entry.openapi(keys_required=keys_required))
    document["info"]["description"] = DESCRIPTION
    # Every route's answers are ours: FastAPI's 422 schemas (the gateway answers 400) go.
    document["components"] = {"schemas": SCHEMAS, "securitySchemes": {"apiKey": BEARER}}
    return document
