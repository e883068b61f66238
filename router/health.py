"""Health endpoints and the gate that keeps requests off models with no ready replica.

- ``GET /health/live``: 200 while the gateway answers; the body lists each model.
- ``GET /health/ready``: 200 only when every model with ``min_replicas > 0`` has a
  running replica, else 503. Models scaled to zero (``min_replicas: 0``) never hold
  readiness back. Until the router's first status read, nothing counts as ready; nor
  while it serves no model at all (its model apps not found yet).

Both bodies: ``{"status", "models": {id: {"state", "reason", "required_for_readiness",
"replicas": {"running", "starting", "min", "max"}, "loading_for_s", "placement"}}}``;
``placement`` lists each serving replica's ``{"replica", "node_id", "cpu_cores",
"how", "shared"}`` (``deployments/cpu_placement.py``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse

from llm_fleet.deployments.config import ModelConfig
from llm_fleet.router.drain import Drain
from llm_fleet.router.model_status import ModelStatus, ModelStatusSource


def _models_body(
    models: Mapping[str, ModelConfig], statuses: Mapping[str, ModelStatus]
) -> dict[str, Any]:
    body: dict[str, Any] = {}
    for model_id, model in models.items():
        status = statuses.get(model_id)
        if status is None:
            scaling = model.autoscaling
            body[model_id] = {
                "state": "unknown",
                "reason": "status not read yet",
                "required_for_readiness": scaling.min_replicas > 0,
                "replicas": {
                    "running": None,
                    "starting": None,
                    "min": scaling.min_replicas,
                    "max": scaling.max_replicas,
                },
                "loading_for_s": None,
                "placement": [],
            }
        else:
            body[model_id] = status.as_json()
    return body


def is_ready(models: Mapping[str, ModelConfig], statuses: Mapping[str, ModelStatus]) -> bool:
    if not models:  # a router whose model apps it has not found yet serves nothing
        return False
    for model_id, model in models.items():
        if model.autoscaling.min_replicas == 0:
            continue
        status = statuses.get(model_id)
        if status is None or status.state != "ready":
            return False
    return True


def add_health_routes(
    app: FastAPI, models: Mapping[str, ModelConfig], source: ModelStatusSource, drain: Drain
) -> None:
    """``/health/live`` and ``/health/ready`` (503 ``draining`` once a drain began)."""

    @app.get("/health/live")
    async def live() -> dict[str, Any]:
        return {"status": "live", "models": _models_body(models, source.snapshot())}

    @app.get("/health/ready")
    async def ready() -> JSONResponse:
        statuses = source.snapshot()
        ok = is_ready(models, statuses) and not drain.draining
        state = "draining" if drain.draining else "ready" if ok else "not_ready"
        body = {"status": state, "models": _models_body(models, statuses)}
        return JSONResponse(body, status_code=200 if ok else 503)
