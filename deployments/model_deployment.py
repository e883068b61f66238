"""The per-model Ray Serve deployment: one replica holds one engine for one model."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from llm_fleet.deployments.caller_watch import CallerWatch
from llm_fleet.deployments.config import CpuBindingConfig, ModelConfig
from llm_fleet.deployments.cpu_placement import (
    BIND_ENV,
    CoreClaims,
    CorePlacement,
    format_core_list,
    place_engine,
    this_process,
)
from llm_fleet.deployments.engine import (
    ENGINE_DEAD,
    AdapterLoadError,
    EngineDeadError,
    EngineInfo,
    EngineRequest,
    LLMEngine,
    Reply,
    error_reply,
)
from llm_fleet.deployments.errors import exception_reason
from llm_fleet.deployments.frame_coalescing import coalesce_frames
from llm_fleet.deployments.replica_status import Phase, PhaseReporter
from llm_fleet.deployments.serve_logging import log_through_serve
from llm_fleet.deployments.weights import resolve_adapter, resolve_weights

logger = logging.getLogger(__name__)

EngineFactory = Callable[[ModelConfig, Path], LLMEngine]
_REMOTE_SCHEMES = ("s3://", "hf://")


def vllm_engine_factory(model: ModelConfig, path: Path) -> LLMEngine:
    from llm_fleet.deployments.vllm_engine import VLLMEngine

    return VLLMEngine(model, path)


def _phase_reporter() -> PhaseReporter | None:
    from ray import serve
    from ray.serve.exceptions import RayServeException

    try:
        context = serve.get_replica_context()
    except RayServeException:
        return None  # constructed outside Serve (a script, a test)
    return PhaseReporter(context.app_name, context.deployment, context.replica_id.unique_id)


def bind_engine_cores(
    model: ModelConfig, binding: CpuBindingConfig, claims: CoreClaims | None = None
) -> CorePlacement | None:
    """Claim this replica's cores and bind the engine it starts next to them.

    The engine's processes inherit ``VLLM_CPU_OMP_THREADS_BIND`` from this one (one
    replica process holds one engine). None: a GPU model, ``cpu_binding.mode: off``, or
    the model's ``env`` leaves binding to vLLM.
    """
    if model.resources.uses_gpu or binding.mode == "off":
        return None
    placement = place_engine(
        num_cpus=model.resources.num_cpus,
        configured=model.resources.cpu_cores,
        env=model.env,
        reserved_cores=binding.reserved_cores,
        claims=claims or CoreClaims(),
        owner=this_process(),
    )
    if placement is not None:
        os.environ[BIND_ENV] = format_core_list(placement.cores)
        logger.info(
            "engine for %s bound to cores %s (%s%s)",
            model.id,
            format_core_list(placement.cores),
            placement.how,
            ", shared with another engine" if placement.shared else "",
        )
    return placement


class ReplicaQueue:
    """A replica's own bound: ``slots`` requests in the engine at once, ``waiting`` more
    waiting their turn in arrival order, and past that a refusal at once.

    Behind the router Serve never sends a replica more than ``max_ongoing_requests``,
    so this never waits there. A direct model's replica is its app's HTTP ingress, and
    Serve's proxy answers its own plain-text 503 when its queue is full; so Serve may
    send that replica more (``direct_deployment_options`` in ``deployments/builder.py``)
    and this bound answers the surplus with the OpenAI-shaped 503 the router would.
    """

    def __init__(self, slots: int, waiting: int):
        self._slots = asyncio.Semaphore(slots)
        self._waiting = 0
        self._max_waiting = waiting

    async def enter(self) -> bool:
        """True once the request holds an engine slot (``leave`` gives it back); False:
        refused, nothing held."""
        if self._slots.locked():
            if self._waiting >= self._max_waiting:
                return False
            self._waiting += 1
            try:
                await self._slots.acquire()
            finally:
                self._waiting -= 1
        else:
            await self._slots.acquire()
        return True

    def leave(self) -> None:
        self._slots.release()


def _node_id() -> str | None:
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None


class LoadedAdapter:
    """An adapter loaded in this replica's engine. Serve's multiplexing unloads the least
    recently used one past ``max_adapters_per_replica``: it awaits the object's
    ``__del__`` if it has one. Set on the instance, not the class, so that the garbage
    collector (which calls a class's ``__del__`` without awaiting) leaves it alone."""

    def __init__(self, engine: LLMEngine, adapter_id: str):
        self.engine, self.adapter_id = engine, adapter_id
        self.__del__ = self.unload

    async def unload(self) -> None:
        await self.engine.unload_adapter(self.adapter_id)


def _adapter_loader(
    load: Callable[[str], Awaitable[LoadedAdapter]], keep: int
) -> Callable[[str], Awaitable[LoadedAdapter]]:
    """``load`` through Serve's multiplexing inside a Serve replica: it keeps ``keep``
    adapters loaded and tells Serve's routers which, so that an adapter's requests go to
    replicas that have it. Outside Serve (unit tests), a plain cache of ``keep``."""
    from ray import serve
    from ray.serve.exceptions import RayServeException

    try:
        serve.get_replica_context()
    except RayServeException:
        loaded: dict[str, LoadedAdapter] = {}

        async def cached(adapter_id: str) -> LoadedAdapter:
            if adapter_id not in loaded:
                if len(loaded) >= keep:
                    oldest = next(iter(loaded))
                    await loaded.pop(oldest).unload()
                loaded[adapter_id] = await load(adapter_id)
            return loaded[adapter_id]

        return cached

    async def loader(adapter_id: str) -> LoadedAdapter:  # a function: Serve sets attributes on it
        return await load(adapter_id)

    return serve.multiplexed(max_num_models_per_replica=keep)(loader)  # type: ignore[no-any-return]


class ModelDeployment:
    """Loads the model's weights, starts its engine and serves the engine contract.

    The router calls :meth:`generate` through a streaming handle; Serve calls
    :meth:`check_health` every ``health_check_period_s`` and restarts the replica
    when the engine is dead. While the constructor runs, the replica publishes its
    phase (downloading, loading, failed with the reason) for the router's /health.
    """

    # Ray Serve awaits an async __init__: the replica counts as started once the engine is.
    async def __init__(  # type: ignore[misc]
        self,
        model: ModelConfig,
        engine_factory: EngineFactory | None = None,
        cpu_binding: CpuBindingConfig | None = None,
        coalesce_frames: bool = False,
    ):
        log_through_serve("llm_fleet")
        self._model = model
        self._coalesce = coalesce_frames
        self._engine: LLMEngine | None = None
        self._engine_died: str | None = None  # why, once the engine is dead
        self._callers = CallerWatch()
        self._queue = ReplicaQueue(model.max_ongoing_requests, model.max_queued_requests)
        self._phase = _phase_reporter()
        try:
            self._report("downloading" if model.source.startswith(_REMOTE_SCHEMES) else "loading")
            # In a thread: a download must not stall the replica's event loop.
            path = await asyncio.to_thread(resolve_weights, model)
            # Every adapter verified before the engine starts; each loads on first use.
            self._adapter_paths = {
                a.id: await asyncio.to_thread(resolve_adapter, model, a) for a in model.adapters
            }
            self._report("loading")
            cores = bind_engine_cores(model, cpu_binding or CpuBindingConfig())
            self._engine = (engine_factory or vllm_engine_factory)(model, path)
            self._info = await self._engine.start()
        except BaseException as exc:
            if self._phase is not None:
                self._phase.set("failed", exception_reason(exc))
            raise
        self._use_adapter = _adapter_loader(self._load_adapter, model.max_adapters_per_replica)
        placement: dict[str, Any] = {"node_id": _node_id(), "cpu_cores": None}
        self._report("serving", {**placement, **(cores.as_json() if cores else {})})

    async def _load_adapter(self, adapter_id: str) -> LoadedAdapter:
        assert self._engine is not None
        await self._engine.load_adapter(adapter_id, self._adapter_paths[adapter_id])
        logger.info("model %s: adapter %s loaded", self._model.id, adapter_id)
        return LoadedAdapter(self._engine, adapter_id)

    def _report(self, phase: Phase, placement: dict[str, Any] | None = None) -> None:
        if self._phase is not None:
            self._phase.set(phase, placement=placement)

    async def generate(self, request: EngineRequest) -> AsyncIterator[str | Reply]:
        """The engine's stream; a whole answer carries the seconds the engine took.

        ``request.caller``: the calling router replica's actor name; if it dies, the
        request is cancelled (``deployments/caller_watch.py``).
        """
        assert self._engine is not None
        if self._engine_died is not None:
            yield self._dead_reply()
            return
        adapter = request.body.get("model")
        if adapter != self._model.id and adapter in self._adapter_paths:
            try:
                await self._use_adapter(adapter)
            except AdapterLoadError as exc:
                logger.error("model %s: %s", self._model.id, exc)
                yield error_reply(
                    503,
                    f"Adapter '{adapter}' could not be loaded; operators: see the replica log.",
                    error_type="service_unavailable",
                    code="adapter_load_failed",
                )
                return
        if not await self._queue.enter():
            yield self._full_reply()
            return
        started = time.perf_counter()
        answered = False
        caller = request.caller
        untrack = None
        try:
            untrack = self._callers.track(caller) if caller is not None else None
            stream = self._engine.generate(request.route, request.body, request.request_id)
            if self._coalesce:
                stream = coalesce_frames(stream)
            # Closed here, not whenever it is collected: closing aborts the generation.
            async with contextlib.aclosing(stream):
                async for item in stream:
                    if isinstance(item, Reply):
                        item = dataclasses.replace(item, engine_s=time.perf_counter() - started)
                    answered = True
                    yield item
        except EngineDeadError as exc:
            self._engine_died = exception_reason(exc)
            logger.error("engine of %s died: %s", self._model.id, self._engine_died)
            if answered:
                raise  # mid-stream: the router ends the stream with an error frame
            yield self._dead_reply()
        finally:
            self._queue.leave()
            if untrack is not None:
                untrack()

    def _full_reply(self) -> Reply:
        message = f"Model '{self._model.id}' is at capacity; retry shortly."
        return error_reply(503, message, error_type="service_unavailable")

    def _dead_reply(self) -> Reply:
        message = f"model {self._model.id!r}: its engine stopped; a new replica is starting"
        return error_reply(503, message, error_type="service_unavailable", code=ENGINE_DEAD)

    async def info(self) -> EngineInfo:
        return self._info

    async def num_unfinished_requests(self) -> int:
        assert self._engine is not None
        return await self._engine.num_unfinished_requests()

    async def check_health(self) -> None:
        """Raise (Serve then replaces this replica) if the engine is dead or unhealthy."""
        assert self._engine is not None
        if self._engine_died is not None:
            raise RuntimeError(f"engine dead: {self._engine_died}")
        await self._engine.check_health()

    async def __del__(self) -> None:
        # Serve calls this on replicas whose __init__ failed (weights unreachable) too.
        phase = getattr(self, "_phase", None)
        if phase is not None and getattr(self, "_info", None) is not None:
            phase.remove()
        callers = getattr(self, "_callers", None)
        if callers is not None:
            await callers.stop()
        engine = getattr(self, "_engine", None)
        if engine is not None:
            await engine.shutdown()
