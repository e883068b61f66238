"""The OpenAI-compatible FastAPI app: ``create_app`` puts the gateway together.

It takes the validated config and one ``ModelClient`` per allowed model, and knows
nothing of Ray, so unit tests run it over the fake engine. Where each part lives:

- the routes: ``router/routes.py`` (inference, models, metrics), ``router/health.py``;
- one request's steps, in order: ``router/pipeline.py`` (its docstring lists them);
- the error shape: ``router/errors.py``; the handlers below map every exception to it;
- middleware: request ids (``router/request_id.py``), the header limit
  (``router/middleware.py``), CORS;
- ``/openapi.json``: ``router/openapi_operations.py``; ``/swagger-ui``:
  ``router/swagger_ui.py`` (FastAPI's ``/docs`` and ``/redoc`` stay off: they load
  from a CDN).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from llm_fleet.deployments.config import FleetConfig
from llm_fleet.router.api_errors import APIError, BadRequestError, InternalServerError
from llm_fleet.router.auth import KeyRing
from llm_fleet.router.drain import Drain
from llm_fleet.router.errors import error_response
from llm_fleet.router.health import add_health_routes
from llm_fleet.router.metrics import NoMetrics, RouterMetrics
from llm_fleet.router.middleware import HeaderLimit
from llm_fleet.router.model_client import ModelClient
from llm_fleet.router.model_status import AlwaysReady, ModelStatusSource
from llm_fleet.router.openapi_operations import describe_api
from llm_fleet.router.pipeline import Pipeline
from llm_fleet.router.quota import LocalQuota, QuotaBackend
from llm_fleet.router.request_id import RequestIdMiddleware, request_id_of
from llm_fleet.router.routes import (
    MetricsText,
    inference_api_routes,
    inference_routes,
    metrics_routes,
    model_routes,
)

if TYPE_CHECKING:
    from llm_fleet.router.tracing import RequestTracer
from llm_fleet.router.chat_ui import chat_ui_routes
from llm_fleet.router.swagger_ui import swagger_ui_routes

__all__ = ["MetricsText", "create_app"]

logger = logging.getLogger(__name__)


def create_app(
    config: FleetConfig,
    clients: Mapping[str, ModelClient],
    *,
    status: ModelStatusSource | None = None,
    metrics: RouterMetrics | None = None,
    metrics_text: MetricsText | None = None,
    echo_request_id: bool = True,
    keys: KeyRing | None = None,
    quota: QuotaBackend | None = None,
    drain: Drain | None = None,
    tracer: RequestTracer | None = None,
) -> FastAPI:
    """The gateway for ``config``'s models; ``clients`` has one entry per allowed model.

    ``status`` gates requests on model readiness and feeds /health (default: every
    model counts as ready); ``metrics`` records each request; ``metrics_text`` gives
    the Prometheus text served at /metrics (none: 404). ``echo_request_id=False``
    behind Ray Serve's proxy, which echoes X-Request-Id itself.

    ``keys``: every route but /health/*, /openapi.json and /swagger-ui needs one of
    these API keys (401 otherwise), and a key sees only its models (any other is the
    404 of an unknown model). None:
    no auth at all. ``quota`` counts each key's requests, tokens and concurrency
    (default with keys: in this process, ``LocalQuota``). ``drain``: the replica's
    drain before a shutdown (``router/drain.py``; none: never drains). ``tracer``:
    one span per inference request over OTLP (``router/tracing.py``; none: no tracing).
    """
    pipeline = Pipeline(
        config,
        clients,
        source=status or AlwaysReady(),
        recorder=metrics or NoMetrics(),
        quota=quota or LocalQuota(),
        keys=keys,
        drain=drain,
        tracer=tracer,
    )
    app = FastAPI(title="llm-fleet", docs_url=None, redoc_url=None)
    app.state.pipeline = pipeline  # the router replica adds and removes model apps' models
    _install_error_handlers(app, echo_request_id)
    app.include_router(model_routes(pipeline))
    add_health_routes(app, pipeline.models, pipeline.source, pipeline.drain)
    if metrics_text is not None and config.router.expose_metrics:
        app.include_router(metrics_routes(pipeline, metrics_text))
    app.include_router(inference_routes(pipeline))
    app.include_router(inference_api_routes(pipeline))
    app.include_router(swagger_ui_routes())
    app.include_router(chat_ui_routes())
    describe_api(app, keys_required=keys is not None)

    app.add_middleware(HeaderLimit, max_bytes=config.router.max_header_bytes)
    app.add_middleware(RequestIdMiddleware, echo=echo_request_id)
    if config.router.cors_allowed_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(config.router.cors_allowed_origins),
            allow_methods=["GET", "POST", "OPTIONS"],
            # SDKs send their own headers (the openai SDK's x-stainless-*): allow any.
            allow_headers=["*"],
            expose_headers=["X-Request-Id"],
        )
    return app


def _install_error_handlers(app: FastAPI, echo_request_id: bool) -> None:
    """Every error the app can raise, answered in the OpenAI shape with the request id."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> Response:
        return error_response(exc, request_id_of(request.scope))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> Response:
        return error_response(BadRequestError(str(exc)), request_id_of(request.scope))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        err = APIError(
            str(exc.detail),
            status_code=exc.status_code,
            code="not_found" if exc.status_code == 404 else None,
        )
        err.error_type = "invalid_request_error"
        return error_response(err, request_id_of(request.scope))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        logger.exception("unhandled error in %s", request.url.path)
        request_id = request_id_of(request.scope)
        response = error_response(InternalServerError("unhandled"), request_id)
        if echo_request_id:
            # Starlette runs this handler outside all middleware, RequestIdMiddleware too.
            response.headers["X-Request-Id"] = request_id
        return response
