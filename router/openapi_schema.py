"""The request bodies and error answers of the OpenAI routes, for ``/openapi.json``.

The routes read their JSON themselves (``router/protocol.py``: any field vLLM accepts
passes through), so FastAPI cannot infer these. They list the fields OpenAI clients
send most and the checks the router makes; other fields are allowed
(``additionalProperties``) and go to vLLM, which validates them. Schema-driven clients
and fuzzers (``tests/serve/test_schema_fuzz.py`` runs schemathesis on them) read them.
"""

from __future__ import annotations

from typing import Any

_STOP: dict[str, Any] = {
    "anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}, {"type": "null"}]
}

# Sampling fields shared by both routes.
_SAMPLING: dict[str, Any] = {
    "max_tokens": {"type": ["integer", "null"], "minimum": 1},
    "temperature": {"type": ["number", "null"], "minimum": 0, "maximum": 2},
    "top_p": {"type": ["number", "null"], "exclusiveMinimum": 0, "maximum": 1},
    "n": {"type": ["integer", "null"], "minimum": 1},
    "stream": {"type": ["boolean", "null"]},
    "stream_options": {
        "type": ["object", "null"],
        "properties": {"include_usage": {"type": ["boolean", "null"]}},
    },
    "stop": _STOP,
    "seed": {"type": ["integer", "null"]},
    "presence_penalty": {"type": ["number", "null"], "minimum": -2, "maximum": 2},
    "frequency_penalty": {"type": ["number", "null"], "minimum": -2, "maximum": 2},
    "user": {"type": ["string", "null"]},
}

_CONTENT_PART: dict[str, Any] = {
    "type": "object",
    "properties": {"type": {"type": "string"}, "text": {"type": "string"}},
    "required": ["type"],
}

_MESSAGE: dict[str, Any] = {
    "type": "object",
    "required": ["role"],
    "properties": {
        "role": {"enum": ["system", "developer", "user", "assistant", "tool", "function"]},
        "content": {
            "anyOf": [
                {"type": "string"},
                {"type": "array", "items": _CONTENT_PART},
                {"type": "null"},
            ]
        },
        "name": {"type": "string"},
    },
}

_PROMPT: dict[str, Any] = {
    "anyOf": [
        {"type": "string"},
        {"type": "array", "items": {"type": "string"}, "minItems": 1},
        {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1},
    ]
}


def _request(field: str, schema: dict[str, Any], **own: dict[str, Any]) -> dict[str, Any]:
    """A request body: ``model`` and ``field`` required, the route's ``own`` fields and
    the shared sampling ones; any other field is allowed (vLLM validates it)."""
    return {
        "type": "object",
        "required": ["model", field],
        "properties": {
            "model": {"type": "string", "description": "a model id from GET /v1/models"},
            field: schema,
            **own,
            **_SAMPLING,
        },
        "additionalProperties": True,
    }


CHAT_REQUEST = _request(
    "messages",
    {"type": "array", "minItems": 1, "items": _MESSAGE},
    max_completion_tokens={"type": ["integer", "null"], "minimum": 1},
    logprobs={"type": ["boolean", "null"]},
    top_logprobs={"type": ["integer", "null"], "minimum": 0},
)
COMPLETION_REQUEST = _request(
    "prompt",
    _PROMPT,
    echo={"type": ["boolean", "null"]},
    logprobs={"type": ["integer", "null"], "minimum": 0},
)

ERROR_BODY: dict[str, Any] = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
                "request_id": {"type": "string"},
            },
        }
    },
}

_ERRORS = {
    "400": "invalid request, or a limit on it exceeded",
    "401": "no valid API key (when the gateway has keys)",
    "404": "unknown model, or one the key may not use",
    "413": "request body too large",
    "415": "not a JSON body",
    "429": "the API key's quota reached (Retry-After)",
    "503": "the model not ready, at capacity, or its engine restarting (Retry-After)",
    "504": "the request took longer than router.request_timeout_s",
}


def inference_openapi(request_schema: dict[str, Any]) -> dict[str, Any]:
    """``openapi_extra`` for an inference route whose JSON body is ``request_schema``."""
    error = {"content": {"application/json": {"schema": ERROR_BODY}}}
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": request_schema}},
        },
        "responses": {
            "200": {
                "description": "the answer (JSON), or with stream: true an SSE stream",
                "content": {"application/json": {}, "text/event-stream": {}},
            },
            **{status: {"description": why, **error} for status, why in _ERRORS.items()},
        },
    }


# The LLM Inference API's bodies (router/inference_api.py): /api/chat takes the chat
# request; /api/generate a prompt string. ``stream`` is the route's, never the body's.
API_GENERATE_REQUEST = _request("prompt", {"type": "string"})
API_CHAT_REQUEST = CHAT_REQUEST
