"""The engine contract: what a model replica offers, whichever engine is inside.

A request goes in as an :class:`EngineRequest`: the route, the client's OpenAI JSON body
(already checked by the router), the request id and the calling router replica. What
comes back is an async stream of items:

- a streaming request yields SSE frames (``str``, each ``"data: {...}\\n\\n"``, the
  last one ``"data: [DONE]\\n\\n"``), or one :class:`Reply` with an error if the
  request failed before its first chunk;
- a non-streaming request yields exactly one :class:`Reply`.

A failed request's ``Reply`` is made by :func:`error_reply`, the one place an engine
error takes its shape (its body by :func:`error_body`, which also builds the router's
own error bodies); the router reads it back as an :class:`EngineError`
(``Reply.error``) and maps it by status and code, never by the message's wording.

An engine that can serve no more requests (it died, whether or not its processes did)
raises :class:`EngineDeadError` from ``generate`` and fails ``check_health`` from then
on: the replica answers 503 (``ENGINE_DEAD``) and Serve replaces it.

Plain ``str`` and a small dataclass cross the Ray handle cheaply. Cancelling the
stream (the router does that when its client disconnects) aborts the generation.
The real engine (``deployments/vllm_engine.py``) and the fake one
(``tests/fake_engine.py``) both pass ``tests/contract``.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

Route = Literal["chat", "completions"]
# The codes an engine may give a failed request beyond its status (OpenAI's names).
CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"
ENGINE_DEAD = "engine_dead"


class EngineDeadError(Exception):
    """The engine can serve no more requests: the replica must be replaced."""


class AdapterLoadError(Exception):
    """A LoRA adapter could not be loaded into the engine (its files, its rank...)."""


@dataclass(frozen=True)
class EngineRequest:
    """One request from the router to a model replica, as the handle call's argument.

    ``prompt`` and ``messages`` expose the body's text to Ray Serve request routers
    that look for them (``PrefixCacheAffinityRouter`` reads ``.prompt``/``.messages``).
    ``caller`` is the router replica's actor name (``deployments/caller_watch.py``).
    """

    route: Route
    body: dict[str, Any]
    request_id: str
    caller: str | None = None

    @property
    def prompt(self) -> Any:
        return self.body.get("prompt")

    @property
    def messages(self) -> Any:
        return self.body.get("messages")


@dataclass(frozen=True)
class EngineError:
    """A failed request as the engine reported it: the status and OpenAI error fields."""

    status: int
    message: str
    type: str
    param: str | None = None
    code: str | None = None


@dataclass(frozen=True)
class Reply:
    """A whole (non-streamed) answer: the OpenAI JSON body and its HTTP status."""

    status: int
    body: dict[str, Any] = field(default_factory=dict)
    # Seconds the replica spent on it (its engine queue included); set by the
    # deployment, read by the router for the Server-Timing header.
    engine_s: float | None = None

    @property
    def ok(self) -> bool:
        return self.status < 400

    @property
    def error(self) -> EngineError | None:
        """The failure this reply reports, or None for an answer."""
        if self.ok:
            return None
        raw = self.body.get("error")
        fields = raw if isinstance(raw, dict) else {}
        code = fields.get("code")
        return EngineError(
            status=self.status,
            message=str(fields.get("message") or "request failed"),
            type=str(fields.get("type") or "invalid_request_error"),
            param=fields.get("param"),
            code=code if isinstance(code, str) else None,
        )


def error_body(
    message: str,
    error_type: str,
    *,
    param: str | None = None,
    code: str | None = None,
    request_id: str | None = None,
) -> dict[str, Any]:
    """The OpenAI error body ``{"error": {"message", "type", "param", "code"}}``, plus
    ``request_id`` when given: the one function that builds it, for an engine's
    :func:`error_reply` and for the router's HTTP responses and SSE error frames
    (``router/errors.py``)."""
    error: dict[str, Any] = {"message": message, "type": error_type, "param": param, "code": code}
    if request_id is not None:
        error["request_id"] = request_id
    return {"error": error}


def error_reply(
    status: int,
    message: str,
    *,
    error_type: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
) -> Reply:
    """A failed request's Reply: the one place an engine error takes its shape."""
    return Reply(status=status, body=error_body(message, error_type, param=param, code=code))


@dataclass(frozen=True)
class EngineInfo:
    """Facts about a loaded model the router needs."""

    model_id: str
    max_model_len: int


class LLMEngine(Protocol):
    """One loaded model inside one replica."""

    async def start(self) -> EngineInfo:
        """Load the model; returns once requests can be served."""
        ...

    def generate(
        self, route: Route, body: dict[str, Any], request_id: str
    ) -> AsyncGenerator[str | Reply, None]:
        """Serve one OpenAI request; see the module docstring for what it yields.

        An async generator: closing it before its end aborts the generation.
        """
        ...

    async def load_adapter(self, adapter_id: str, path: Path) -> None:
        """Load the LoRA adapter in ``path``; requests whose ``model`` is ``adapter_id``
        are served with it from then on. Raises ``AdapterLoadError`` if it cannot."""
        ...

    async def unload_adapter(self, adapter_id: str) -> None:
        """Forget a loaded adapter (its requests then need a new load)."""
        ...

    async def check_health(self) -> None:
        """Raise if the engine cannot serve."""
        ...

    async def num_unfinished_requests(self) -> int:
        """Requests the engine is still generating (observability and tests)."""
        ...

    async def shutdown(self) -> None:
        """Stop the engine and its subprocesses."""
        ...
