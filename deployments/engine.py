"""The engine contract: what a model replica offers, whichever engine is inside.

A request goes in as the client's OpenAI JSON body (already checked by the router);
what comes back is an async stream of items:

- a streaming request yields SSE frames (``str``, each ``"data: {...}\\n\\n"``, the
  last one ``"data: [DONE]\\n\\n"``), or one :class:`Reply` with an error if the
  request failed before its first chunk;
- a non-streaming request yields exactly one :class:`Reply`.

Plain ``str`` and a small dataclass cross the Ray handle cheaply. Cancelling the
stream (the router does that when its client disconnects) aborts the generation.
The real engine (``deployments/vllm_engine.py``) and the fake one
(``tests/fake_engine.py``) both pass ``tests/contract``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

Route = Literal["chat", "completions"]


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
    ) -> AsyncIterator[str | Reply]:
        """Serve one OpenAI request; see the module docstring for what it yields."""
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
