"""The JSON Schemas of the gateway's bodies, for ``/openapi.json``: ``SCHEMAS`` holds them
by component name (``router/openapi_operations.py`` says which route sends or answers which).

The routes read their JSON themselves (``router/protocol.py``: any field vLLM accepts
passes through), so FastAPI cannot infer these. The requests list the fields OpenAI
clients send most and the checks the router makes; the answers list the fields OpenAI
clients read. Other fields are allowed both ways (``additionalProperties``): vLLM
validates a request's and adds its own to an answer. Schema-driven clients and fuzzers
(``tests/serve/test_schema_fuzz.py`` runs schemathesis on them) read them.
"""

from __future__ import annotations

from typing import Any

from llm_fleet.router.model_status import STATES

Schema = dict[str, Any]


def ref(name: str) -> Schema:
    """A reference to the component schema ``name`` of ``SCHEMAS``."""
    return {"$ref": f"#/components/schemas/{name}"}


_STOP: Schema = {
    "anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}, {"type": "null"}]
}

# Sampling fields shared by both routes.
_SAMPLING: Schema = {
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

_CONTENT_PART: Schema = {
    "type": "object",
    "properties": {"type": {"type": "string"}, "text": {"type": "string"}},
    "required": ["type"],
}

_MESSAGE: Schema = {
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

_PROMPT: Schema = {
    "anyOf": [
        {"type": "string"},
        {"type": "array", "items": {"type": "string"}, "minItems": 1},
        {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1},
    ]
}


def _request(field: str, schema: Schema, example: Schema, **own: Schema) -> Schema:
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
        "examples": [example],
    }


CHAT_REQUEST = _request(
    "messages",
    {"type": "array", "minItems": 1, "items": _MESSAGE},
    {"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": "Hello!"}]},
    max_completion_tokens={"type": ["integer", "null"], "minimum": 1},
    logprobs={"type": ["boolean", "null"]},
    top_logprobs={"type": ["integer", "null"], "minimum": 0},
)
COMPLETION_REQUEST = _request(
    "prompt",
    _PROMPT,
    {"model": "gemma-3-270m", "prompt": "Once upon a time", "max_tokens": 16},
    echo={"type": ["boolean", "null"]},
    logprobs={"type": ["integer", "null"], "minimum": 0},
)

ERROR_BODY: Schema = {
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


def _answer(object_name: str, choice: Schema, *, chunk: bool) -> Schema:
    """An OpenAI answer (a whole one, or one chunk of a stream) whose ``object`` is
    ``object_name`` and whose choices have the fields ``choice``."""
    finish = {
        "type": ["string", "null"],
        "description": "stop, length, ...; null on a stream's chunks before the last",
    }
    return {
        "type": "object",
        "required": ["id", "object", "created", "model", "choices"],
        "properties": {
            "id": {"type": "string"},
            "object": {"const": object_name},
            "created": {"type": "integer", "description": "Unix seconds"},
            "model": {"type": "string"},
            "choices": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["index"] if chunk else ["index", "finish_reason"],
                    "properties": {
                        "index": {"type": "integer", "minimum": 0},
                        **choice,
                        "logprobs": {"type": ["object", "null"]},
                        "finish_reason": finish,
                    },
                },
            },
            "usage": {
                "anyOf": [ref("Usage"), {"type": "null"}],
                "description": "on a stream: only the last chunk's, with include_usage",
            },
        },
    }


_USAGE: Schema = {
    "type": "object",
    "required": ["prompt_tokens", "completion_tokens", "total_tokens"],
    "properties": {
        name: {"type": "integer", "minimum": 0}
        for name in ("prompt_tokens", "completion_tokens", "total_tokens")
    },
}

_ASSISTANT: Schema = {
    "role": {"type": "string"},
    "content": {"type": ["string", "null"]},
    "tool_calls": {"type": ["array", "null"], "items": {"type": "object"}},
}

_MODEL: Schema = {
    "type": "object",
    "required": ["id", "object", "created", "owned_by"],
    "properties": {
        "id": {"type": "string"},
        "object": {"const": "model"},
        "created": {"type": "integer"},
        "owned_by": {"type": "string"},
        "status": {"enum": list(STATES), "description": "the model's state (llm-fleet's own)"},
    },
}

_NULLABLE_INT: Schema = {"type": ["integer", "null"], "minimum": 0}

_MODEL_HEALTH: Schema = {
    "type": "object",
    "required": ["state", "reason", "required_for_readiness", "replicas", "placement"],
    "properties": {
        "state": {"enum": [*STATES, "unknown"]},
        "reason": {"type": ["string", "null"]},
        "required_for_readiness": {"type": "boolean"},
        "replicas": {
            "type": "object",
            "properties": {
                "running": _NULLABLE_INT,
                "starting": _NULLABLE_INT,
                "min": {"type": "integer", "minimum": 0},
                "max": {"type": "integer", "minimum": 0},
            },
        },
        "loading_for_s": {"type": ["number", "null"]},
        "placement": {
            "type": "array",
            "description": "each serving replica's CPU cores (router/health.py)",
            "items": {"type": "object"},
        },
    },
}

# The LLM Inference API's bodies (router/inference_api.py). ``stream`` is the route's.
API_GENERATE_REQUEST = _request(
    "prompt",
    {"type": "string"},
    {
        "model": "smollm2-135m-instruct",
        "prompt": "What is the capital of France?",
        "max_tokens": 32,
        "temperature": 0.7,
    },
)
_API_ANSWER: Schema = {
    "type": "object",
    "required": ["id", "model", "created", "text", "finish_reason", "usage"],
    "properties": {
        "id": {"type": ["string", "null"]},
        "model": {"type": ["string", "null"]},
        "created": {"type": ["integer", "null"]},
        "text": {"type": "string", "description": "the generated text"},
        "finish_reason": {"type": ["string", "null"]},
        "usage": {"anyOf": [ref("Usage"), {"type": "null"}]},
        "message": {
            "type": "object",
            "description": "/api/chat only: the assistant's message",
            "properties": {"role": {"const": "assistant"}, "content": {"type": "string"}},
        },
    },
}
_API_EVENT: Schema = {
    "anyOf": [
        {
            "type": "object",
            "required": ["text"],
            "properties": {"text": {"type": "string", "description": "the next piece"}},
            "additionalProperties": False,
        },
        {
            "type": "object",
            "required": ["done", "finish_reason", "usage"],
            "properties": {
                "done": {"const": True},
                "id": {"type": ["string", "null"]},
                "model": {"type": ["string", "null"]},
                "finish_reason": {"type": ["string", "null"]},
                "usage": ref("Usage"),
            },
        },
    ]
}
_LLM: Schema = {
    "type": "object",
    "required": ["id", "state", "replicas", "generate_route", "max_tokens_limit", "defaults"],
    "properties": {
        "id": {"type": "string"},
        "state": {"enum": [*STATES, None]},
        "replicas": {
            "type": ["object", "null"],
            "properties": {
                name: {"type": "integer", "minimum": 0}
                for name in ("running", "starting", "min", "max")
            },
        },
        "generate_route": {"enum": ["chat", "completions"]},
        "max_tokens_limit": {"type": "integer", "minimum": 1},
        "defaults": {
            "type": "object",
            "description": "what a request that sends none gets (null: the engine's default)",
            "properties": {
                "temperature": {"type": ["number", "null"]},
                "top_p": {"type": ["number", "null"]},
                "max_tokens": {"type": "integer", "minimum": 1},
            },
        },
    },
}

SCHEMAS: dict[str, Schema] = {
    "ApiGenerateRequest": API_GENERATE_REQUEST,
    "ApiAnswer": _API_ANSWER,
    "ApiStreamEvent": _API_EVENT,
    "LlmList": {
        "type": "object",
        "required": ["models"],
        "properties": {"models": {"type": "array", "items": _LLM}},
    },
    "ChatCompletionRequest": CHAT_REQUEST,
    "ChatCompletion": _answer(
        "chat.completion", {"message": {"type": "object", "properties": _ASSISTANT}}, chunk=False
    ),
    "ChatCompletionChunk": _answer(
        "chat.completion.chunk", {"delta": {"type": "object", "properties": _ASSISTANT}}, chunk=True
    ),
    "CompletionRequest": COMPLETION_REQUEST,
    "Completion": _answer("text_completion", {"text": {"type": "string"}}, chunk=False),
    "CompletionChunk": _answer("text_completion", {"text": {"type": "string"}}, chunk=True),
    "Usage": _USAGE,
    "Model": _MODEL,
    "ModelList": {
        "type": "object",
        "required": ["object", "data"],
        "properties": {
            "object": {"const": "list"},
            "data": {"type": "array", "items": ref("Model")},
        },
    },
    "Health": {
        "type": "object",
        "required": ["status", "models"],
        "properties": {
            "status": {"enum": ["live", "ready", "not_ready", "draining"]},
            "models": {"type": "object", "additionalProperties": ref("ModelHealth")},
        },
    },
    "ModelHealth": _MODEL_HEALTH,
    "Error": ERROR_BODY,
}
