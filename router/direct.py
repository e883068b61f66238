"""The direct path: one model served at ``/m/<id>/v1`` by its own replicas, no router hop.

A model with ``direct: true`` lives in a Serve application of its own,
``<fleet app>.<id>`` (``llm_fleet.router.builder.build_direct_app``), whose ingress is the model
deployment itself: the proxy hands the HTTP request straight to a model replica, which
runs the same OpenAI app as the router (``llm_fleet.router.app.create_app``: request ids, API keys,
per-key limits, token limits, the SSE relay, OpenAI-shaped errors) over its own engine,
in process. The router keeps serving the model at the one URL too, over a handle to
these same replicas; there is one engine, reached through two doors.

What differs from the router's door, by design:

- one model: ``/v1/models`` lists only it and its adapters (each loaded into this
  replica's engine on first use, as on the router's door), any other ``model`` is a 404;
- a key's quota is the fleet's: the replica counts it in the fleet app's quota
  actor (``router/shared_quota.py``), so both doors draw on one budget;
- no readiness gate: a replica that answers has a running engine, and while the model
  has no replica Serve's proxy holds the request (scale from zero) or rejects it;
  ``/health/*`` describe the replica that answers; the fleet's view is the router's;
- no ``/metrics`` (scrape the router's); requests are counted in the same router
  metrics, logged with the same access line and traced the same way (spans with
  ``llm_fleet.door=direct``);
- overload: the replica bounds its own queue (``ReplicaQueue``) and refuses the
  surplus with the router's OpenAI-shaped 503, since Serve's proxy, past its own queue,
  would answer plain text (``direct_deployment_options`` gives Serve the headroom).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI
from ray import serve

from llm_fleet.deployments.builder import direct_app_name
from llm_fleet.deployments.config import FleetConfig
from llm_fleet.deployments.engine import EngineRequest, Reply, Route
from llm_fleet.deployments.errors import ConfigError
from llm_fleet.deployments.model_deployment import EngineFactory, ModelDeployment
from llm_fleet.deployments.serve_logging import log_through_serve
from llm_fleet.router.app import create_app
from llm_fleet.router.auth import load_keyring
from llm_fleet.router.drain import Drain
from llm_fleet.router.ingress import stop_services
from llm_fleet.router.metrics import RayRouterMetrics
from llm_fleet.router.model_status import ModelStatus
from llm_fleet.router.shared_quota import SharedQuota
from llm_fleet.router.tracing import request_tracer_from_env


class InProcessClient:
    """The ``ModelClient`` of the direct path: the replica's own engine stream, no hop.

    Closing the stream (a client disconnect) closes the engine's generator, which
    aborts the generation in vLLM, as the handle's cancellation does on the router path.
    """

    def __init__(self, replica: ModelDeployment):
        self._replica = replica

    def stream(
        self, route: Route, body: dict[str, Any], request_id: str
    ) -> AsyncIterator[str | Reply]:
        return self._replica.generate(EngineRequest(route, body, request_id))


class ThisReplica:
    """The direct app's status source: the replica answering runs its engine.

    Requests are never gated (``status`` is None: straight to the engine); ``/health``
    shows the model ready with this replica running.
    """

    def __init__(self, status: ModelStatus):
        self._status = status

    def status(self, model_id: str) -> ModelStatus | None:
        return None

    def snapshot(self) -> dict[str, ModelStatus]:
        return {self._status.model: self._status}

    def wake(self, model_id: str) -> None:
        return None

    async def wait_ready(self, model_id: str, timeout_s: float) -> ModelStatus | None:
        return self._status


def fleet_app_of(app_name: str, model_id: str) -> str:
    """The fleet app a direct app belongs to, from the direct app's own name."""
    suffix = "." + model_id
    fleet = app_name.removesuffix(suffix)
    if not app_name.endswith(suffix) or not fleet:
        expected = direct_app_name("<fleet app>", model_id)
        raise ConfigError(
            f"the direct app of model {model_id!r} is named {app_name!r}; name it {expected!r} "
            "(the router looks for the model's replicas there)"
        )
    return fleet


@serve.ingress()
class DirectModelIngress(ModelDeployment):
    """A model deployment that is also its app's HTTP ingress (see the module docstring)."""

    async def __init__(  # type: ignore[misc]
        self,
        config: FleetConfig,
        model_id: str,
        engine_factory: EngineFactory | None = None,
    ):
        log_through_serve("llm_fleet")
        replica = serve.get_replica_context()
        fleet_app = fleet_app_of(replica.app_name, model_id)
        me = replica.replica_id.to_full_id_str()
        self._keys = load_keyring(config)  # first: a bad keys file fails before the engine
        self._tracing = request_tracer_from_env("direct", instance=me)  # so does bad tracing
        model = config.model(model_id)
        assert model is not None  # llm_fleet.router.builder.build_direct_app checked it
        await super().__init__(
            model,
            engine_factory,
            cpu_binding=config.cpu_binding,
            coalesce_frames=config.streaming.coalesce_frames,
        )
        if self._keys is not None:
            await self._keys.start()
        self._quota = (
            SharedQuota(fleet_app, lease_s=config.router.quota_lease_s, holder=me)
            if self._keys is not None or config.router.max_concurrent_requests is not None
            else None
        )
        scaling = model.autoscaling
        here = ModelStatus(
            model=model_id,
            state="ready",
            min_replicas=scaling.min_replicas,
            max_replicas=scaling.max_replicas,
            running=1,
            reason="this replica answers; the router's /health shows every replica",
        )
        one_model = config.model_copy(update={"models": [model]})
        self._drain = Drain(config.router.drain_dir)
        await self._drain.start()
        engine = InProcessClient(self)  # the model's and its adapters' (one engine)
        self._app = create_app(
            one_model,
            {i: engine for i in [model_id, *(a.id for a in model.adapters)]},
            status=ThisReplica(here),
            metrics=RayRouterMetrics(),
            echo_request_id=False,  # Serve's proxy echoes X-Request-Id itself
            keys=self._keys,
            quota=self._quota,
            drain=self._drain,
            tracer=self._tracing,
        )

    def __serve_build_asgi_app__(self) -> FastAPI:
        return self._app

    async def __del__(self) -> None:
        await stop_services(self, "_keys", "_quota", "_drain", "_tracing")
        await super().__del__()


@serve.ingress()
class LeftOutIngress:
    """The direct app of a model that ``LLM_ALLOWED_MODELS`` leaves out: no engine, and
    every model is the OpenAI-shaped 404 of an unknown model."""

    def __init__(self, config: FleetConfig):
        log_through_serve("llm_fleet")
        self._app = create_app(config.model_copy(update={"models": []}), {}, echo_request_id=False)

    def __serve_build_asgi_app__(self) -> FastAPI:
        return self._app
