"""The OpenAI-compatible FastAPI app: routing, allowlist, token limits, SSE relay.

``create_app`` takes the validated config and one ``ModelClient`` per allowed model;
it knows nothing of Ray, so unit tests run it over the fake engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from deployments.config import FleetConfig, ModelConfig
from deployments.engine import Reply, Route
from deployments.errors import (
    APIError,
    BadRequestError,
    InternalServerError,
    ModelNotFoundError,
    api_error_from_status,
)
from router.errors import error_frame, error_response
from router.limits import apply_token_limits
from router.model_client import ModelClient
from router.protocol import parse_request
from router.request_id import RequestIdMiddleware, request_id_of
from router.sse import DONE_FRAME, SSE_HEADERS

logger = logging.getLogger("llm_fleet.router")


class ClientDisconnected(Exception):
    """The client went away before the first item arrived."""


async def _read_json(request: Request, max_bytes: int) -> Any:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise APIError(
            f"Request body exceeds {max_bytes} bytes.", status_code=413, code="request_too_large"
        )
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > max_bytes:
            raise APIError(
                f"Request body exceeds {max_bytes} bytes.",
                status_code=413,
                code="request_too_large",
            )
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadRequestError(
            f"The request body is not valid JSON: {exc}", code="invalid_json"
        ) from None


async def _wait_for_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _first_item(request: Request, stream: AsyncIterator[str | Reply]) -> str | Reply:
    """The stream's first item, or ClientDisconnected if the client leaves first.

    A non-streamed answer is one item, so this watch covers its whole generation.
    """
    first = asyncio.ensure_future(anext(stream))
    gone = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        done, _ = await asyncio.wait({first, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if first in done:
        return first.result()
    first.cancel()
    with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
        await first
    raise ClientDisconnected


async def _relay(
    first: str, stream: AsyncIterator[str | Reply], request_id: str
) -> AsyncIterator[str]:
    """Relay frames as they come; an error after the first frame becomes an SSE error frame."""
    try:
        yield first
        async for item in stream:
            if isinstance(item, str):
                yield item
    except APIError as err:
        yield error_frame(err, request_id)
        yield DONE_FRAME
    except Exception:
        logger.exception("stream %s failed", request_id)
        yield error_frame(InternalServerError("stream failed"), request_id)
        yield DONE_FRAME
    finally:
        await stream.aclose()  # type: ignore[attr-defined]


def create_app(
    config: FleetConfig, clients: Mapping[str, ModelClient], *, echo_request_id: bool = True
) -> FastAPI:
    """The gateway for ``config``'s models; ``clients`` has one entry per allowed model.

    ``echo_request_id=False`` behind Ray Serve's proxy, which echoes X-Request-Id itself.
    """
    models: dict[str, ModelConfig] = {m.id: m for m in config.models if m.id in clients}
    created = int(time.time())
    max_bytes = config.router.max_request_bytes
    app = FastAPI(title="llm-fleet", docs_url=None, redoc_url=None)

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

    def _model_card(model_id: str) -> dict[str, Any]:
        return {"id": model_id, "object": "model", "created": created, "owned_by": "llm-fleet"}

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [_model_card(m) for m in models]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str) -> dict[str, Any]:
        if model_id not in models:
            raise ModelNotFoundError(model_id)
        return _model_card(model_id)

    async def serve(route: Route, request: Request) -> Response:
        request_id = request_id_of(request.scope)
        body = await _read_json(request, max_bytes)
        parsed = parse_request(route, body)
        model = models.get(parsed.model)
        if model is None:
            raise ModelNotFoundError(parsed.model)
        body = apply_token_limits(route, body, model.limits)
        stream = clients[model.id].stream(route, body, request_id)
        try:
            first = await _first_item(request, stream)
        except ClientDisconnected:
            logger.info("request %s: client disconnected before the answer", request_id)
            return Response(status_code=499)
        except StopAsyncIteration:
            raise InternalServerError(f"model {model.id} returned nothing") from None
        if isinstance(first, Reply):
            await stream.aclose()  # type: ignore[attr-defined]
            if first.ok:
                return JSONResponse(first.body, status_code=first.status)
            error = first.body.get("error", {})
            raise api_error_from_status(
                first.status, str(error.get("message", "request failed")), param=error.get("param")
            )
        return StreamingResponse(
            _relay(first, stream, request_id), media_type="text/event-stream", headers=SSE_HEADERS
        )

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await serve("chat", request)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await serve("completions", request)

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
