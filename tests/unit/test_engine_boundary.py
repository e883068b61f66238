"""The typed boundary between the router and a model replica (``deployments/engine.py``)."""

from __future__ import annotations

import pickle

import pytest

from llm_fleet.deployments.engine import (
    CONTEXT_LENGTH_EXCEEDED,
    EngineError,
    EngineRequest,
    Reply,
    error_reply,
)
from llm_fleet.router.api_errors import (
    BadRequestError,
    InternalServerError,
    ServiceUnavailableError,
    api_error_from_engine,
)


def test_a_request_shows_its_prompt_or_messages_to_serve_request_routers() -> None:
    chat = EngineRequest("chat", {"messages": [{"role": "user", "content": "Hi"}]}, "r1", "me")
    assert chat.messages == [{"role": "user", "content": "Hi"}] and chat.prompt is None
    completion = EngineRequest("completions", {"prompt": "Once"}, "r2")
    assert completion.prompt == "Once" and completion.messages is None
    # It crosses the Ray handle pickled.
    assert pickle.loads(pickle.dumps(chat)) == chat


def test_an_error_reply_reads_back_as_the_same_engine_error() -> None:
    reply = error_reply(400, "too long", param="max_tokens", code=CONTEXT_LENGTH_EXCEEDED)
    assert not reply.ok
    assert reply.error == EngineError(
        400, "too long", "invalid_request_error", "max_tokens", CONTEXT_LENGTH_EXCEEDED
    )
    assert Reply(status=200, body={"id": "x"}).error is None


def test_a_malformed_error_body_still_reads_as_an_error() -> None:
    error = Reply(status=502, body={"error": "not a dict"}).error
    assert error is not None and error.status == 502 and error.message == "request failed"
    # vLLM puts the HTTP status in code: not a string code, so none.
    assert Reply(status=400, body={"error": {"message": "m", "code": 400}}).error.code is None  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("reply", "kind", "code"),
    [
        (
            error_reply(400, "x", code=CONTEXT_LENGTH_EXCEEDED),
            BadRequestError,
            CONTEXT_LENGTH_EXCEEDED,
        ),
        # The wording alone does not make the code: the engine sets it.
        (error_reply(400, "over the maximum context length"), BadRequestError, None),
        (error_reply(503, "busy"), ServiceUnavailableError, None),
        (error_reply(500, "boom"), InternalServerError, None),
    ],
)
def test_the_router_maps_by_status_and_code(reply: Reply, kind: type, code: str | None) -> None:
    assert reply.error is not None
    err = api_error_from_engine(reply.error)
    assert isinstance(err, kind)
    if kind is BadRequestError:
        assert err.code == code
