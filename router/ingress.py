"""The router as a Ray Serve ingress deployment."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI
from ray import serve

from llm_fleet.deployments.builder import direct_app_name
from llm_fleet.deployments.config import FleetConfig, ModelConfig
from llm_fleet.deployments.serve_logging import log_through_serve
from llm_fleet.router.app import create_app
from llm_fleet.router.auth import load_keyring
from llm_fleet.router.drain import Drain
from llm_fleet.router.metrics import RayRouterMetrics
from llm_fleet.router.model_apps import ModelAppFollower
from llm_fleet.router.model_client import HandleModelClient
from llm_fleet.router.node_metrics import NodeMetrics
from llm_fleet.router.shared_quota import SharedQuota
from llm_fleet.router.status_board import ServeStatusBoard
from llm_fleet.router.tracing import request_tracer_from_env

if TYPE_CHECKING:
    from ray.serve.handle import DeploymentHandle


@serve.ingress()
class RouterIngress:
    """Builds the FastAPI app at replica start from the config and the model handles.

    Before taking traffic it reads the models' state once, so the first request is
    already gated on it; then a status board polls Ray Serve in the background. With
    ``router.keys_file`` it loads the API keys (a missing or invalid file fails the
    replica) and follows the file; each key's limits are counted once for all router
    replicas, by the app's quota actor (``router/shared_quota.py``).
    """

    async def __init__(  # type: ignore[misc]
        self, config: FleetConfig, models: dict[str, DeploymentHandle[Any]]
    ):
        log_through_serve("llm_fleet")
        self._keys = load_keyring(config)  # first: a bad keys file fails before anything starts
        replica = serve.get_replica_context()
        me = replica.replica_id.to_full_id_str()  # this replica's actor name
        self._tracing = request_tracer_from_env("router", instance=me)  # a bad one fails here
        app_name = replica.app_name
        # A direct: true model's replicas are the ingress of their own app (router/direct.py).
        apps = {
            m.id: direct_app_name(app_name, m.id) if m.direct else app_name for m in config.models
        }
        models = {
            **models,
            **{
                m.id: serve.get_deployment_handle(m.id, app_name=apps[m.id])
                for m in config.models
                if m.direct
            },
        }
        transport = config.streaming.handle_transport

        def client(
            model_id: str, handle: DeploymentHandle[Any], model: ModelConfig
        ) -> HandleModelClient:
            affinity = model.prefix_affinity
            chars = affinity.prefix_chars if affinity.enabled else None
            return HandleModelClient(
                model_id, handle, me, transport=transport, affinity_chars=chars
            )

        def served(model: ModelConfig, handle: DeploymentHandle[Any]) -> dict[str, Any]:
            """The model's client and one per adapter: Serve's multiplexing sends an
            adapter's requests to replicas that have it loaded."""
            return {
                model.id: client(model.id, handle, model),
                **{
                    a.id: client(a.id, handle.options(multiplexed_model_id=a.id), model)
                    for a in model.adapters
                },
            }

        clients = {
            k: v
            for m in config.models
            if m.id in models
            for k, v in served(m, models[m.id]).items()
        }
        metrics = RayRouterMetrics()
        followed: dict[str, ModelConfig] = {}

        def add(model: ModelConfig, app: str) -> None:  # a model app the router follows
            # The app may still be building: its deployment appears a moment later.
            handle = serve.get_deployment_handle(model.id, app_name=app, _check_exists=False)
            if model.id in followed:
                remove(model.id)  # a changed config: its adapters may differ
            self._board.add_model(model, app, handle)
            views = {model.id: model, **model.adapter_views()}
            for served_id, served_client in served(model, handle).items():
                self._app.state.pipeline.add_model(views[served_id], served_client)
            followed[model.id] = model

        def remove(model_id: str) -> None:
            model = followed.pop(model_id, None)
            adapters = [a.id for a in model.adapters] if model is not None else []
            for served_id in [model_id, *adapters]:
                self._app.state.pipeline.remove_model(served_id)
            self._board.remove_model(model_id)

        follower = ModelAppFollower(app_name, set(apps), add, remove, os.environ)
        self._board = ServeStatusBoard(
            apps, config, models, on_update=metrics.models_updated, on_apps=follower.follow
        )
        if self._keys is not None:
            await self._keys.start()
        self._quota = (
            SharedQuota(
                app_name,
                lease_s=config.router.quota_lease_s,
                holder=me,
            )
            if self._keys is not None or config.router.max_concurrent_requests is not None
            else None
        )
        self._drain = Drain(config.router.drain_dir)
        await self._drain.start()
        # Serve's proxy echoes X-Request-Id on every response; echoing too would send it twice.
        self._app = create_app(
            config,
            clients,
            status=self._board,
            metrics=metrics,
            metrics_text=NodeMetrics(),
            echo_request_id=False,
            keys=self._keys,
            quota=self._quota,
            drain=self._drain,
            tracer=self._tracing,
        )
        # Last: its first poll may add the model apps' models to the app made above.
        await self._board.start()

    def __serve_build_asgi_app__(self) -> FastAPI:
        return self._app

    async def __del__(self) -> None:
        await stop_services(self, "_board", "_keys", "_quota", "_drain", "_tracing")


async def stop_services(replica: object, *names: str) -> None:
    """Stop the background services a replica started (those its __init__ got to)."""
    for name in names:
        service = getattr(replica, name, None)
        if service is not None:
            await service.stop()
