"""The per-model Ray Serve deployment: one replica holds one engine for one model."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from deployments.config import ModelConfig
from deployments.engine import EngineInfo, LLMEngine, Reply, Route
from deployments.weights import resolve_weights

logger = logging.getLogger(__name__)

EngineFactory = Callable[[ModelConfig, Path], LLMEngine]


def vllm_engine_factory(model: ModelConfig, path: Path) -> LLMEngine:
    from deployments.vllm_engine import VLLMEngine

    return VLLMEngine(model, path)


def _log_through_serve() -> None:
    """Send our modules' INFO logs (download progress, conversion) to the replica log.

    In a replica only Ray's loggers have handlers; ours would fall to Python's
    WARNING-only last resort. Ray Serve's logger adds the replica's context and honours
    its JSON/log-level settings.
    """
    ours = logging.getLogger("deployments")
    ours.setLevel(logging.INFO)
    ours.handlers = list(logging.getLogger("ray.serve").handlers)
    ours.propagate = False


class ModelDeployment:
    """Loads the model's weights, starts its engine and serves the engine contract.

    The router calls :meth:`generate` through a streaming handle; Serve calls
    :meth:`check_health` every ``health_check_period_s`` and restarts the replica
    when the engine is dead.
    """

    # Ray Serve awaits an async __init__: the replica counts as started once the engine is.
    async def __init__(  # type: ignore[misc]
        self, model: ModelConfig, engine_factory: EngineFactory | None = None
    ):
        _log_through_serve()
        self._model = model
        path = resolve_weights(model)
        self._engine = (engine_factory or vllm_engine_factory)(model, path)
        self._info = await self._engine.start()

    async def generate(
        self, route: Route, body: dict[str, Any], request_id: str
    ) -> AsyncIterator[str | Reply]:
        async for item in self._engine.generate(route, body, request_id):
            yield item

    async def info(self) -> EngineInfo:
        return self._info

    async def num_unfinished_requests(self) -> int:
        return await self._engine.num_unfinished_requests()

    async def check_health(self) -> None:
        await self._engine.check_health()

    async def __del__(self) -> None:
        # Serve calls this on replicas whose __init__ failed (weights unreachable) too.
        engine = getattr(self, "_engine", None)
        if engine is not None:
            await engine.shutdown()
