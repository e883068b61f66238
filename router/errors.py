"""Turning an ``APIError`` into what the client sees: exactly two functions.

:func:`error_response` makes the HTTP response; :func:`error_frame` makes the SSE
frame sent when a stream fails after its first chunk. Both produce the OpenAI error
body ``{"error": {"message", "type", "param", "code", "request_id"}}`` (built by
``error_body`` in ``deployments/engine.py``, as engines' errors are); a 5xx never
carries internals, only a generic message and the request id to quote (503 and 504
carry the router's own words, which say what to do and hold no internals).
"""

from __future__ import annotations

import json
from typing import Any

from fastapi.responses import JSONResponse

from llm_fleet.deployments.engine import error_body
from llm_fleet.router.api_errors import APIError

_HIDDEN_MESSAGE = "The server had an error while processing your request."
_SAID_AS_IS = (503, 504)


def _body(err: APIError, request_id: str) -> dict[str, Any]:
    hidden = err.status_code >= 500 and err.status_code not in _SAID_AS_IS
    message = _HIDDEN_MESSAGE if hidden else err.message
    return error_body(
        message, err.error_type, param=err.param, code=err.code, request_id=request_id
    )


def error_response(err: APIError, request_id: str) -> JSONResponse:
    """The HTTP response for ``err``; 429 and 503 say when to retry, 401 how to log in."""
    headers = {"Retry-After": str(err.retry_after_s)} if err.status_code in (429, 503) else {}
    if err.status_code == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse(_body(err, request_id), status_code=err.status_code, headers=headers)


def error_frame(err: APIError, request_id: str) -> str:
    """The SSE frame for an error that happens mid-stream."""
    return f"data: {json.dumps(_body(err, request_id))}\n\n"
