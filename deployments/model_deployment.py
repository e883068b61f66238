"""The per-model Ray Serve deployment: one replica holds one engine for one model."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from deployments.caller_watch import CallerWatch
from deployments.config import ModelConfig
from deployments.engine import EngineInfo, LLMEngine, Reply, Route
from deployments.replica_status import Phase, PhaseReporter
from deployments.serve_logging import log_through_serve
from deployments.weights import resolve_weights

logger = logging.getLogger(__name__)

EngineFactory = Callable[[ModelConfig, Path], LLMEngine]
_REMOTE_SCHEMES = ("s3://", "hf://")


def vllm_engine_factory(model: ModelConfig, path: Path) -> LLMEngine:
    from deployments.vllm_engine import VLLMEngine

    return VLLMEngine(model, path)


def failure_reason(exc: BaseException) -> str:
    """One line for /health: the error's type and the first line of its message.

    A pydantic ValidationError (vLLM validates its configs with pydantic) gives its
    first error's message: its own first line only names the class that failed.
    """
    if isinstance(exc, ValidationError) and exc.errors():
        first = str(exc.errors()[0]["msg"]).removeprefix("Value error, ")
    else:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        first = lines[0] if lines else ""
    text = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    return text[:500]


def _phase_reporter() -> PhaseReporter | None:
    from ray import serve
    from ray.serve.exceptions import RayServeException

    try:
        context = serve.get_replica_context()
    except RayServeException:
        return None  # constructed outside Serve (a script, a test)
    return PhaseReporter(context.app_name, context.deployment, context.replica_id.unique_id)


class ModelDeployment:
    """Loads the model's weights, starts its engine and serves the engine contract.

    The router calls :meth:`generate` through a streaming handle; Serve calls
    :meth:`check_health` every ``health_check_period_s`` and restarts the replica
    when the engine is dead. While the constructor runs, the replica publishes its
    phase (downloading, loading, failed with the reason) for the router's /health.
    """

    # Ray Serve awaits an async __init__: the replica counts as started once the engine is.
    async def __init__(  # type: ignore[misc]
        self, model: ModelConfig, engine_factory: EngineFactory | None = None
    ):
        log_through_serve("deployments")
        self._model = model
        self._engine: LLMEngine | None = None
        self._callers = CallerWatch()
        self._phase = _phase_reporter()
        try:
            self._report("downloading" if model.source.startswith(_REMOTE_SCHEMES) else "loading")
            # In a thread: a download must not stall the replica's event loop.
            path = await asyncio.to_thread(resolve_weights, model)
            self._report("loading")
            self._engine = (engine_factory or vllm_engine_factory)(model, path)
            self._info = await self._engine.start()
        except BaseException as exc:
            if self._phase is not None:
                self._phase.set("failed", failure_reason(exc))
            raise
        if self._phase is not None:
            self._phase.remove()

    def _report(self, phase: Phase) -> None:
        if self._phase is not None:
            self._phase.set(phase)

    async def generate(
        self, route: Route, body: dict[str, Any], request_id: str, caller: str | None = None
    ) -> AsyncIterator[str | Reply]:
        """The engine's stream; a whole answer carries the seconds the engine took.

        ``caller``: the calling router replica's actor name; if it dies, the request is
        cancelled (``deployments/caller_watch.py``).
        """
        assert self._engine is not None
        started = time.perf_counter()
        untrack = self._callers.track(caller) if caller is not None else None
        try:
            async for item in self._engine.generate(route, body, request_id):
                if isinstance(item, Reply):
                    item = dataclasses.replace(item, engine_s=time.perf_counter() - started)
                yield item
        finally:
            if untrack is not None:
                untrack()

    async def info(self) -> EngineInfo:
        return self._info

    async def num_unfinished_requests(self) -> int:
        assert self._engine is not None
        return await self._engine.num_unfinished_requests()

    async def check_health(self) -> None:
        assert self._engine is not None
        await self._engine.check_health()

    async def __del__(self) -> None:
        # Serve calls this on replicas whose __init__ failed (weights unreachable) too.
        callers = getattr(self, "_callers", None)
        if callers is not None:
            await callers.stop()
        engine = getattr(self, "_engine", None)
        if engine is not None:
            await engine.shutdown()
