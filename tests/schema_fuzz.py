"""schemathesis over the gateway's ``/openapi.json``: generated requests, valid and not,
and the two things every answer must hold (no server error; a refusal in the OpenAI
shape with its request id). Used by ``tests/unit/test_schema_fuzz.py`` (the app in
process, over the fake engine) and ``tests/serve/test_schema_fuzz.py`` (the live gateway).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import schemathesis
from hypothesis import HealthCheck, given, settings

# Answers that are not failures: readiness says 503 while a model is not ready.
READINESS = "GET /health/ready"


def with_served_model(model: str) -> Callable[[Any], Any]:
    """A body transform: half the bodies that name a model name ``model`` (chosen by a
    hash of what was generated, so an example replays), the rest stay unknown models."""

    def transform(body: Any) -> Any:
        named = isinstance(body, dict) and isinstance(body.get("model"), str)
        if named and hashlib.sha256(body["model"].encode()).digest()[0] % 2 == 0:
            return {**body, "model": model}
        return body

    return transform


def check_answer(label: str, status: int, headers: Any, body: Any) -> None:
    """No server error; every refusal an OpenAI error body with the request id of its
    ``X-Request-Id`` header (and ``Retry-After`` on a 429 or 503)."""
    if label == READINESS:
        assert status in (200, 503), status
        return
    assert status < 500 or status == 503, (label, status, body)
    if status < 400:
        return
    error = body["error"]
    # OpenAI's shape; ``code`` may be null (an engine's refusal of a sampling field).
    assert error["message"] and error["type"] and "code" in error and "param" in error, error
    assert error["request_id"] == headers["x-request-id"], (error, headers)
    if status in (429, 503):
        assert int(headers["retry-after"]) >= 1


Send = Callable[[schemathesis.Case], tuple[int, Any, Any]]


def sender(http: Any, base_url: str) -> Send:
    """``send`` for :func:`fuzz` over an httpx-style client (``httpx.Client`` or
    Starlette's ``TestClient``): status, headers and the parsed body (text if not JSON)."""

    def send(case: schemathesis.Case) -> tuple[int, Any, Any]:
        kwargs = case.as_transport_kwargs(base_url=base_url)
        kwargs.pop("cookies", None)  # none in this API; per-request cookies are deprecated
        response = http.request(**kwargs)
        try:
            body = response.json()
        except ValueError:
            body = response.text
        return response.status_code, response.headers, body

    return send


def fuzz(
    schema: schemathesis.BaseSchema,
    send: Callable[[schemathesis.Case], tuple[int, Any, Any]],
    *,
    model: str,
    max_examples: int,
) -> dict[str, dict[int, int]]:
    """Generate ``max_examples`` requests per operation, send each with ``send`` (which
    returns status, headers, parsed body), check each answer; returns the statuses seen
    per operation."""
    seen: dict[str, dict[int, int]] = {}
    for result in schema.get_all_operations():
        operation = result.ok()
        seen[operation.label] = _fuzz_one(operation, send, model, max_examples)
    return seen


def _fuzz_one(
    operation: schemathesis.APIOperation,
    send: Callable[[schemathesis.Case], tuple[int, Any, Any]],
    model: str,
    max_examples: int,
) -> dict[int, int]:
    counts: dict[int, int] = {}
    pick_model = with_served_model(model)

    @given(case=operation.as_strategy())
    @settings(
        max_examples=max_examples,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        derandomize=True,
        database=None,
    )
    def one(case: schemathesis.Case) -> None:
        case.body = pick_model(case.body)
        status, headers, body = send(case)
        counts[status] = counts.get(status, 0) + 1
        check_answer(operation.label, status, headers, body)

    one()
    return counts
