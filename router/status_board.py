"""The real ``ModelStatusSource``: polls Ray Serve from inside a router replica.

Every ``router.status_poll_interval_s`` it reads ``serve.status()`` (one controller
call) and the replicas' phase entries in the GCS, derives each model's state
(``router/model_status.py``) and hands it to the metrics. Each router replica polls
on its own, so a request is gated on a view at most one interval old.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

from ray.serve.exceptions import RayServeException

from llm_fleet.deployments.background import PeriodicLoop, Sleep, stop_task
from llm_fleet.deployments.config import FleetConfig, ModelConfig
from llm_fleet.deployments.replica_status import (
    GCS_ERRORS,
    STALE_AFTER_S,
    delete_phase,
    read_phases,
)
from llm_fleet.router.model_status import DeploymentView, ModelStatus, derive_status

if TYPE_CHECKING:
    from ray.serve.handle import DeploymentHandle

logger = logging.getLogger(__name__)
# A wake call is a real request to the model's handle: it waits in Serve's queue, which
# is what makes the autoscaler add a replica, and is dropped after this long.
WAKE_TIMEOUT_S = 900.0


class ServeStatusBoard:
    def __init__(
        self,
        apps: Mapping[str, str],
        config: FleetConfig,
        handles: Mapping[str, DeploymentHandle[Any]],
        on_update: Callable[[dict[str, ModelStatus]], None] | None = None,
        *,
        sleep: Sleep = asyncio.sleep,
        on_apps: Callable[[dict[str, str]], Awaitable[None]] | None = None,
    ):
        self._apps = dict(apps)  # model id -> the Serve app holding its deployment
        self._models = {m.id: m for m in config.models if m.id in handles}
        self._handles = dict(handles)
        # An adapter's state is its model's: it runs on the model's replicas.
        self._aliases = {a.id: m.id for m in self._models.values() for a in m.adapters}
        self._on_update = on_update
        # Each poll hands it every Serve app's status: the router follows model apps.
        self._on_apps = on_apps
        self._statuses: dict[str, ModelStatus] = {}
        self._changed = asyncio.Event()
        self._wakes: dict[str, asyncio.Task[None]] = {}
        self._polling = PeriodicLoop(
            "polling the models' status",
            self.poll,
            config.router.status_poll_interval_s,
            sleep=sleep,
            logger=logger,
        )

    async def start(self) -> None:
        """Read once (so the first request is gated), then keep polling."""
        await self.poll()
        self._polling.start()

    async def stop(self) -> None:
        await self._polling.stop()
        for task in self._wakes.values():
            await stop_task(task)

    def status(self, model_id: str) -> ModelStatus | None:
        return self._statuses.get(self._aliases.get(model_id, model_id))

    def snapshot(self) -> dict[str, ModelStatus]:
        aliased = {a: self._statuses[m] for a, m in self._aliases.items() if m in self._statuses}
        return {**self._statuses, **aliased}

    def wake(self, model_id: str) -> None:
        model_id = self._aliases.get(model_id, model_id)
        pending = self._wakes.get(model_id)
        if pending is None or pending.done():
            self._wakes[model_id] = asyncio.create_task(self._wake(model_id))

    async def wait_ready(self, model_id: str, timeout_s: float) -> ModelStatus | None:
        deadline = time.monotonic() + timeout_s
        while True:
            current = self._statuses.get(model_id)
            if current is None or current.state in ("ready", "failed"):
                return current
            left = deadline - time.monotonic()
            if left <= 0:
                return current
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), timeout=left)

    def add_model(self, model: ModelConfig, app: str, handle: DeploymentHandle[Any]) -> None:
        """Watch ``model`` (in Serve app ``app``) from the next poll on."""
        self._remove_aliases(model.id)
        self._apps[model.id], self._models[model.id], self._handles[model.id] = app, model, handle
        self._aliases.update({a.id: model.id for a in model.adapters})

    def remove_model(self, model_id: str) -> None:
        self._remove_aliases(model_id)
        for table in (self._apps, self._models, self._handles):
            table.pop(model_id, None)
        self._statuses = {m: s for m, s in self._statuses.items() if m != model_id}

    def _remove_aliases(self, model_id: str) -> None:
        self._aliases = {a: m for a, m in self._aliases.items() if m != model_id}

    async def poll(self) -> None:
        try:
            statuses, apps = await asyncio.to_thread(self._read)
        except (*GCS_ERRORS, RayServeException) as exc:  # keep the last view; poll again
            logger.warning("could not read the models' status from Ray Serve: %s", exc)
            return
        if self._on_apps is not None:
            known = set(self._models)
            await self._on_apps(apps)
            if set(self._models) - known:  # a model app's model: gate its requests from now
                try:
                    statuses, _ = await asyncio.to_thread(self._read)
                except (*GCS_ERRORS, RayServeException) as exc:
                    logger.warning("could not read the models' status from Ray Serve: %s", exc)
            statuses = {m: s for m, s in statuses.items() if m in self._models}
        self._statuses = statuses
        self._changed.set()
        if self._on_update is not None:
            self._on_update(statuses)

    async def _wake(self, model_id: str) -> None:
        response = self._handles[model_id].info.remote()
        try:
            await asyncio.wait_for(_awaited(response), timeout=WAKE_TIMEOUT_S)
        except (*GCS_ERRORS, RayServeException) as exc:
            response.cancel()  # type: ignore[no-untyped-call]
            logger.info("wake call to %s ended: %s", model_id, type(exc).__name__)

    def _read(self) -> tuple[dict[str, ModelStatus], dict[str, str]]:
        """The models' statuses, and every Serve app's status by name."""
        from ray import serve

        applications = serve.status().applications
        now = time.time()
        statuses = {}
        for model_id, model in self._models.items():
            app_name = self._apps[model_id]
            app = applications.get(app_name)
            overview = app.deployments.get(model_id) if app is not None else None
            view = None
            if overview is not None:
                view = DeploymentView(
                    status=_name(overview.status),
                    message=overview.message,
                    replica_states={_name(k): v for k, v in overview.replica_states.items()},
                )
            phases = read_phases(app_name, model_id)
            self._prune(app_name, model_id, phases, now)
            statuses[model_id] = derive_status(model, view, phases, now)
        return statuses, {name: _name(app.status) for name, app in applications.items()}

    def _prune(self, app_name: str, model_id: str, phases: Mapping[str, Any], now: float) -> None:
        """Drop entries of replicas long gone; keep the newest failure for its reason."""
        failures = sorted(
            (item for item in phases.items() if item[1].phase == "failed"),
            key=lambda item: item[1].updated,
        )
        stale = [rid for rid, p in phases.items() if p.phase != "failed" and p.fresh(now) is False]
        old = [rid for rid, _ in failures[:-1]]
        for replica in stale + old:
            if now - phases[replica].updated > 4 * STALE_AFTER_S or replica in old:
                delete_phase(app_name, model_id, replica)


def _name(value: Any) -> str:
    """Serve's status enums arrive as enums or, through serve.status(), as plain str."""
    return str(getattr(value, "value", value))


async def _awaited(response: Any) -> None:
    await response
