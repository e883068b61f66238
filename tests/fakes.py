"""Hand-written doubles for the unit tests: the router's model clients over FakeEngine.

``FakeModelClient`` stands where ``HandleModelClient`` stands in production, so
``router.app.create_app`` runs unchanged over it; it can also raise what a real
client raises (a dead replica, back-pressure, a failure mid-stream).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI

from deployments.config import FleetConfig
from deployments.engine import Reply, Route
from deployments.fake_engine import FakeEngine
from router.app import create_app

CHAT_MODEL = "smollm2-135m-instruct"
COMPLETIONS_MODEL = "gemma-3-270m"
# Configured but given no client: what LLM_ALLOWED_MODELS leaves out.
NOT_ALLOWED_MODEL = "llama-not-allowed"
DEFAULT_MAX_TOKENS = 12  # not vLLM's completions default (16), so a test tells them apart
MAX_TOKENS_LIMIT = 64
MAX_MODEL_LEN = 256


class FakeModelClient:
    """A ``ModelClient`` over a ``FakeEngine``.

    ``error_before_first`` is raised before anything is yielded; ``error_mid_stream``
    is raised in place of item number ``error_after`` (counting from 0).
    """

    def __init__(
        self,
        engine: FakeEngine,
        *,
        error_before_first: Exception | None = None,
        error_mid_stream: Exception | None = None,
        error_after: int = 1,
    ) -> None:
        self.engine = engine
        self.error_before_first = error_before_first
        self.error_mid_stream = error_mid_stream
        self.error_after = error_after

    async def stream(
        self, route: Route, body: dict[str, Any], request_id: str
    ) -> AsyncIterator[str | Reply]:
        if self.error_before_first is not None:
            raise self.error_before_first
        # Closing this stream closes the engine's, as HandleModelClient cancels its call.
        async with contextlib.aclosing(self.engine.generate(route, body, request_id)) as items:
            sent = 0
            async for item in items:
                if self.error_mid_stream is not None and sent == self.error_after:
                    raise self.error_mid_stream
                yield item
                sent += 1


def fleet_config(**router: Any) -> FleetConfig:
    """Three configured models (one not allowed) with small token limits."""
    limits = {"default_max_tokens": DEFAULT_MAX_TOKENS, "max_tokens_limit": MAX_TOKENS_LIMIT}
    models = [
        {"id": model_id, "source": f"embedded://{model_id}", "limits": limits}
        for model_id in (CHAT_MODEL, COMPLETIONS_MODEL, NOT_ALLOWED_MODEL)
    ]
    return FleetConfig.model_validate({"models": models, "router": router})


@dataclass
class Fleet:
    """The app under test and the fakes behind it."""

    app: FastAPI
    engines: dict[str, FakeEngine] = field(default_factory=dict)

    async def unfinished(self) -> int:
        return sum([await engine.num_unfinished_requests() for engine in self.engines.values()])


def make_fleet(
    *,
    token_delay_s: float = 0.0,
    client_options: dict[str, Any] | None = None,
    extra_clients: dict[str, FakeModelClient] | None = None,
    **router: Any,
) -> Fleet:
    """The router app over fake engines for the allowed models.

    ``client_options`` go to every ``FakeModelClient`` (e.g. an error to raise);
    ``router`` overrides ``RouterConfig`` fields.
    """
    engines = {
        model_id: FakeEngine(model_id, max_model_len=MAX_MODEL_LEN, token_delay_s=token_delay_s)
        for model_id in (CHAT_MODEL, COMPLETIONS_MODEL)
    }
    clients = {
        model_id: FakeModelClient(engine, **(client_options or {}))
        for model_id, engine in engines.items()
    }
    clients.update(extra_clients or {})
    return Fleet(app=create_app(fleet_config(**router), clients), engines=engines)
