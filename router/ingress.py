"""The router as a Ray Serve ingress deployment."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fastapi import FastAPI
from ray import serve

from deployments.config import FleetConfig
from router.app import create_app
from router.model_client import HandleModelClient

if TYPE_CHECKING:
    from ray.serve.handle import DeploymentHandle


@serve.ingress()
class RouterIngress:
    """Builds the FastAPI app at replica start from the config and the model handles."""

    def __init__(self, config: FleetConfig, models: dict[str, DeploymentHandle[Any]]):
        clients = {model_id: HandleModelClient(model_id, h) for model_id, h in models.items()}
        # Serve's proxy echoes X-Request-Id on every response; echoing too would send it twice.
        self._app = create_app(config, clients, echo_request_id=False)

    def __serve_build_asgi_app__(self) -> FastAPI:
        return self._app
