"""The gateway's OpenAI routes and its metrics route, each an ``APIRouter`` that
``create_app`` includes (``/health/*``: ``router/health.py``).

The inference routes hand the request to the pipeline (``router/pipeline.py``); the
model routes list what the caller's key may use. What ``/openapi.json`` says of each
route: ``router/openapi_operations.py``.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from llm_fleet.deployments.engine import Route
from llm_fleet.router.api_errors import ModelNotFoundError
from llm_fleet.router.inference_api import API_SHAPES, ApiShape, llm_list
from llm_fleet.router.pipeline import Pipeline

MetricsText = Callable[[], Awaitable[str]]
# Each inference route's path (also the ``http.route`` of its trace spans).
ROUTE_PATHS: dict[Route, str] = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}


def inference_routes(pipeline: Pipeline) -> APIRouter:
    """``POST /v1/chat/completions`` and ``POST /v1/completions``."""
    routes = APIRouter()

    @routes.post(ROUTE_PATHS["chat"])
    async def chat_completions(request: Request) -> Response:
        return await pipeline.handle("chat", request)

    @routes.post(ROUTE_PATHS["completions"])
    async def completions(request: Request) -> Response:
        return await pipeline.handle("completions", request)

    return routes


def inference_api_routes(pipeline: Pipeline) -> APIRouter:
    """The LLM Inference API's ``POST /api/generate``, ``/api/chat`` (each also
    ``/stream``) on the same pipeline, and ``GET /api/llms`` (``router/inference_api.py``)."""
    routes = APIRouter()

    def endpoint(shape: ApiShape) -> Callable[[Request], Awaitable[Response]]:
        async def handle(request: Request) -> Response:
            return await pipeline.handle(shape.route, request, shape)

        return handle

    for path, shape in API_SHAPES.items():
        routes.add_api_route(path, endpoint(shape), methods=["POST"])

    @routes.get("/api/llms")
    async def list_llms(request: Request) -> dict[str, Any]:
        shown = pipeline.visible(pipeline.authenticate(request))
        return llm_list(shown, pipeline.source.snapshot())

    return routes


def model_routes(pipeline: Pipeline) -> APIRouter:
    """``GET /v1/models`` and ``GET /v1/models/{id}``: the models the caller may use,
    each with its state (an extra field; OpenAI clients ignore it)."""
    routes = APIRouter()
    created = int(time.time())

    def card(model_id: str) -> dict[str, Any]:
        body: dict[str, Any] = {
            "id": model_id,
            "object": "model",
            "created": created,
            "owned_by": "llm-fleet",
        }
        current = pipeline.source.status(model_id)
        if current is not None:
            body["status"] = current.state
        return body

    @routes.get("/v1/models")
    async def list_models(request: Request) -> dict[str, Any]:
        shown = pipeline.visible(pipeline.authenticate(request))
        return {"object": "list", "data": [card(m) for m in shown]}

    @routes.get("/v1/models/{model_id:path}")
    async def get_model(request: Request, model_id: str) -> dict[str, Any]:
        if model_id not in pipeline.visible(pipeline.authenticate(request)):
            raise ModelNotFoundError(model_id)
        return card(model_id)

    return routes


def metrics_routes(pipeline: Pipeline, scrape: MetricsText) -> APIRouter:
    """``GET /metrics``: the Prometheus text; with keys, any valid key may read it."""
    routes = APIRouter()

    @routes.get("/metrics")
    async def prometheus_metrics(request: Request) -> Response:
        pipeline.authenticate(request)
        return Response(await scrape(), media_type="text/plain; version=0.0.4")

    return routes
