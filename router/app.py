"""The OpenAI-compatible FastAPI app: routing, allowlist, API keys, limits, SSE relay.

``create_app`` takes the validated config and one ``ModelClient`` per allowed model;
it knows nothing of Ray, so unit tests run it over the fake engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from deployments.config import FleetConfig, ModelConfig
from deployments.engine import Reply, Route
from deployments.errors import (
    APIError,
    BadRequestError,
    HeadersTooLargeError,
    InternalServerError,
    ModelNotFoundError,
    RequestTimeoutError,
    RequestTooLargeError,
    UnsupportedMediaTypeError,
    api_error_from_status,
)
from router.accounting import RequestRecord, log_request, uninterrupted
from router.auth import KeyRing, Principal
from router.errors import error_frame, error_response
from router.health import add_health_routes, admit
from router.limits import apply_token_limits, check_request_limits, output_budget
from router.metrics import NoMetrics, RouterMetrics
from router.model_client import ModelClient
from router.model_status import AlwaysReady, ModelStatusSource
from router.protocol import parse_request
from router.quota import LimitBackend, LocalLimits, QuotaHold
from router.request_id import RequestIdMiddleware, request_id_of
from router.sse import DONE_FRAME, SSE_HEADERS, UsageTap, ask_for_usage

MetricsText = Callable[[], Awaitable[str]]
Finish = Callable[[RequestRecord], Awaitable[None]]

logger = logging.getLogger("llm_fleet.router")
T = TypeVar("T")
# How often a request waiting for its first item looks at its model's status (memory).
MODEL_WATCH_S = 0.25


class ClientDisconnected(Exception):
    """The client went away before the first item arrived."""


def _is_json(content_type: str | None) -> bool:
    """A body's declared type is JSON (``application/json``, any ``+json``), or none is
    declared (clients that send none mean JSON; there is nothing else to mean)."""
    media = (content_type or "").split(";", 1)[0].strip().lower()
    return not media or media == "application/json" or media.endswith("+json")


async def _read_json(request: Request, max_bytes: int) -> Any:
    """The body as JSON. Another declared Content-Type is a 415, before the body is read:
    a form or text body is not guessed at (``curl -d`` without ``-H 'Content-Type:
    application/json'`` sends a form)."""
    if not _is_json(request.headers.get("content-type")):
        raise UnsupportedMediaTypeError(
            "The request body must be JSON: send it with 'Content-Type: application/json'."
        )
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise RequestTooLargeError(f"Request body exceeds {max_bytes} bytes.")
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > max_bytes:
            raise RequestTooLargeError(f"Request body exceeds {max_bytes} bytes.")
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadRequestError(
            f"The request body is not valid JSON: {exc}", code="invalid_json"
        ) from None


async def _wait_for_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _while_model_up(model: ModelConfig, source: ModelStatusSource) -> None:
    """Raise ModelNotReadyError once ``model`` has no ready replica (in ``queue`` mode:
    none for ``queue_timeout_s``); never returns otherwise.

    A request sent just before the model lost its last replica (killed, its node gone)
    waits in Ray Serve's handle queue until a replacement runs, a minute or more for a
    real engine; this turns that wait into the 503 any request gets while the model is
    down (``admit``), as soon as the status board sees it.
    """
    while True:
        await asyncio.sleep(MODEL_WATCH_S)
        current = source.status(model.id)
        if current is not None and current.state != "ready":
            await admit(model, source)  # back to ready (queue mode) or ModelNotReadyError


async def _unless_disconnected(
    request: Request, work: Awaitable[T], watch: Awaitable[None] | None = None
) -> T:
    """``work``'s result, or ClientDisconnected (``work`` cancelled) if the client leaves
    first, or ``watch``'s error (``work`` cancelled) if it raises first.

    Used for a stream's first item (a non-streamed answer is one item, so the watch
    covers its whole generation), watching that the model stays up, and for a request
    queued for a loading model.
    """
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_wait_for_disconnect(request))
    watching = None if watch is None else asyncio.ensure_future(watch)
    guards = {gone} if watching is None else {gone, watching}
    try:
        done, _ = await asyncio.wait({task, *guards}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for guard in guards:
            guard.cancel()
    if task in done:
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
        await task
    if watching is not None and watching in done:
        watching.result()  # the watch's error
    raise ClientDisconnected


class _Deadline:
    """``router.request_timeout_s`` for one request, counted from its arrival."""

    def __init__(self, timeout_s: float | None) -> None:
        self.timeout_s = timeout_s
        self.at = None if timeout_s is None else asyncio.get_running_loop().time() + timeout_s

    async def within(self, work: Awaitable[T]) -> T:
        """``work``'s result, or RequestTimeoutError (``work`` cancelled: an engine
        call's generation aborted) once the deadline passes."""
        if self.at is None or self.timeout_s is None:
            return await work
        try:
            async with asyncio.timeout_at(self.at):
                return await work
        except TimeoutError:
            raise RequestTimeoutError(self.timeout_s) from None


class _HeaderLimit:
    """431 for a request whose header names and values total more than ``max_bytes``,
    on every route, before anything else reads it (Serve's proxy takes 64 KiB)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            size = sum(len(name) + len(value) for name, value in scope.get("headers", []))
            if size > self.max_bytes:
                err = HeadersTooLargeError(
                    f"Request headers total {size} bytes, over the limit of {self.max_bytes}."
                )
                await error_response(err, request_id_of(scope))(scope, receive, send)
                return
        await self.app(scope, receive, send)


class _RelayResponse(StreamingResponse):
    """A stream that is settled however its sending ends.

    Starlette may stop sending before the relay's first step (the client left between
    the first frame and the response start) or while the relay waits at a ``yield``;
    either way the relay's own ``finally`` would not run, leaving the engine generating
    and the request in flight for its key and the metrics. ``settle`` closes both.
    """

    def __init__(self, relay: AsyncIterator[str], settle: Callable[[], Awaitable[None]]):
        super().__init__(relay, media_type="text/event-stream", headers=SSE_HEADERS)
        self._settle = settle

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._settle()


async def _relay(
    first: str,
    stream: AsyncIterator[str | Reply],
    record: RequestRecord,
    tap: UsageTap,
    finish: Finish,
    deadline: _Deadline,
) -> AsyncGenerator[str, None]:
    """Relay frames as they come; an error after the first frame becomes an SSE error frame.

    The usage chunk the router asked for is read and dropped unless the client asked
    too. A client that leaves cancels this generator (the engine call is cancelled,
    which aborts the generation) or makes its next send fail (that frame counts as
    sent after the disconnect). Once ``[DONE]`` is sent the answer is complete: the
    relay stops there, so a client closing the connection on ``[DONE]`` (as SDKs do)
    is a 200, not a disconnect. A stream still running at the request's deadline ends
    with a ``request_timeout`` error frame, its generation aborted. However the relay
    ends, its closing out (the engine stream closed, the record finished, the key's
    slot and tokens released) runs to the end, cancellation or not (``uninterrupted``).
    """

    async def frames() -> AsyncGenerator[str, None]:
        yield first
        while True:
            try:
                item = await deadline.within(anext(stream))
            except StopAsyncIteration:
                return
            if isinstance(item, str):
                yield item

    async def close_out() -> None:
        try:
            await stream.aclose()  # type: ignore[attr-defined]
        finally:
            await finish(record)

    try:
        async with contextlib.aclosing(frames()) as items:
            async for frame in items:
                relayed = tap.chunk(frame, record)
                if relayed is not None:
                    yield relayed
                    if relayed.endswith(DONE_FRAME):
                        break
    except APIError as err:
        record.failed(err)
        yield error_frame(err, record.request_id)
        yield DONE_FRAME
    except GeneratorExit:
        record.disconnected, record.status, record.tokens_after_disconnect = True, 499, 1
        raise
    except asyncio.CancelledError:
        record.disconnected, record.status = True, 499
        raise
    except Exception:
        logger.exception("stream %s failed", record.request_id)
        record.status = 500
        yield error_frame(InternalServerError("stream failed"), record.request_id)
        yield DONE_FRAME
    finally:
        await uninterrupted(close_out())


def create_app(
    config: FleetConfig,
    clients: Mapping[str, ModelClient],
    *,
    status: ModelStatusSource | None = None,
    metrics: RouterMetrics | None = None,
    metrics_text: MetricsText | None = None,
    echo_request_id: bool = True,
    keys: KeyRing | None = None,
    limits: LimitBackend | None = None,
) -> FastAPI:
    """The gateway for ``config``'s models; ``clients`` has one entry per allowed model.

    ``status`` gates requests on model readiness and feeds /health (default: every
    model counts as ready); ``metrics`` records each request; ``metrics_text`` gives
    the Prometheus text served at /metrics (none: 404). ``echo_request_id=False``
    behind Ray Serve's proxy, which echoes X-Request-Id itself.

    ``keys``: every route but /health/* needs one of these API keys (401 otherwise),
    and a key sees only its models (any other is the 404 of an unknown model). None:
    no auth at all. ``limits`` counts each key's requests, tokens and concurrency
    (default with keys: in this process, ``LocalLimits``).
    """
    models: dict[str, ModelConfig] = {m.id: m for m in config.models if m.id in clients}
    source = status or AlwaysReady()
    recorder = metrics or NoMetrics()
    quota = limits or LocalLimits()
    created = int(time.time())
    max_bytes = config.router.max_request_bytes
    app = FastAPI(title="llm-fleet", docs_url=None, redoc_url=None)

    def caller(request: Request) -> Principal | None:
        """The request's principal; with keys, none is a 401."""
        return None if keys is None else keys.require(request.headers.get("authorization"))

    def visible(principal: Principal | None) -> dict[str, ModelConfig]:
        if principal is None:
            return models
        return {model_id: m for model_id, m in models.items() if principal.may_use(model_id)}

    def finisher(hold: QuotaHold) -> Finish:
        """Finish a record once: metrics, the access line, and its key's quota released."""

        async def finish(record: RequestRecord) -> None:
            if record.finished_at is not None:
                return
            record.finish()  # first, and with no await before: finished exactly once
            recorder.request_finished(record)
            log_request(record)
            await uninterrupted(hold.release(record.tokens_used))

        return finish

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
        card: dict[str, Any] = {
            "id": model_id,
            "object": "model",
            "created": created,
            "owned_by": "llm-fleet",
        }
        current = source.status(model_id)
        if current is not None:
            card["status"] = current.state  # an extra field; OpenAI clients ignore it
        return card

    @app.get("/v1/models")
    async def list_models(request: Request) -> dict[str, Any]:
        shown = visible(caller(request))
        return {"object": "list", "data": [_model_card(m) for m in shown]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(request: Request, model_id: str) -> dict[str, Any]:
        if model_id not in visible(caller(request)):
            raise ModelNotFoundError(model_id)
        return _model_card(model_id)

    add_health_routes(app, models, source)

    if metrics_text is not None and config.router.expose_metrics:
        scrape = metrics_text

        @app.get("/metrics")
        async def prometheus_metrics(request: Request) -> Response:
            caller(request)  # with keys, any valid key may read the metrics
            return Response(await scrape(), media_type="text/plain; version=0.0.4")

    async def dispatch(
        route: Route, request: Request, record: RequestRecord, hold: QuotaHold, finish: Finish
    ) -> tuple[Response, bool]:
        """The response, and whether its record is already finished (a stream finishes
        its own record when it ends)."""
        deadline = _Deadline(config.router.request_timeout_s)
        body = await _read_json(request, max_bytes)
        parsed = parse_request(route, body)
        model = visible(hold.principal).get(parsed.model)
        if model is None:
            raise ModelNotFoundError(parsed.model)
        record.model, record.stream = model.id, bool(parsed.stream)
        check_request_limits(route, body, model.limits)
        key_cap = hold.principal.limits.max_tokens if hold.principal is not None else None
        body = apply_token_limits(route, body, model.limits, key_cap)
        await hold.take(output_budget(route, body))
        await _unless_disconnected(request, admit(model, source))
        body, drop_usage = ask_for_usage(body)
        record.dispatched()
        recorder.request_dispatched(record)
        stream = clients[model.id].stream(route, body, record.request_id)
        try:
            first = await _unless_disconnected(
                request, deadline.within(anext(stream)), _while_model_up(model, source)
            )
        except StopAsyncIteration:
            raise InternalServerError(f"model {model.id} returned nothing") from None
        record.replied_at = time.perf_counter()
        if isinstance(first, Reply):
            await stream.aclose()  # type: ignore[attr-defined]
            record.engine_s = first.engine_s
            if not first.ok:
                error = first.body.get("error", {})
                raise api_error_from_status(
                    first.status,
                    str(error.get("message", "request failed")),
                    param=error.get("param"),
                )
            record.usage(first.body.get("usage"))
            headers = {"Server-Timing": record.server_timing()}
            return JSONResponse(first.body, status_code=first.status, headers=headers), False
        relay = _relay(first, stream, record, UsageTap(drop_usage), finish, deadline)

        async def never_started() -> None:
            if record.finished_at is None:
                record.disconnected, record.status = True, 499
                try:
                    await stream.aclose()  # type: ignore[attr-defined]
                finally:
                    await finish(record)

        async def settle() -> None:
            try:
                await relay.aclose()  # a relay suspended mid-stream finishes the record itself
            finally:
                await uninterrupted(never_started())

        return _RelayResponse(relay, settle), True

    async def serve(route: Route, request: Request) -> Response:
        """One request, start to end: the one place its record and key hold are closed
        out, on every way it can end (an answer, an error, the client leaving before the
        answer or Serve cancelling the task), except a stream handed to its relay, which
        closes itself out when it ends (``_relay``, ``_RelayResponse``)."""
        record = RequestRecord(request_id=request_id_of(request.scope), endpoint=route)
        hold = QuotaHold(quota, None)
        finish = finisher(hold)
        handed_to_relay = False
        try:
            hold.principal = caller(request)
            record.key = hold.principal.id if hold.principal is not None else None
            response, handed_to_relay = await dispatch(route, request, record, hold, finish)
            if not handed_to_relay:
                record.status = response.status_code
            return response
        except ClientDisconnected:
            logger.info("request %s: client disconnected before the answer", record.request_id)
            record.disconnected, record.status = True, 499
            return Response(status_code=499)
        except APIError as err:
            record.failed(err)
            if record.engine_s is not None:
                response = error_response(err, record.request_id)
                response.headers["Server-Timing"] = record.server_timing()
                return response
            raise
        except asyncio.CancelledError:
            # Serve cancels the request's task when its client leaves.
            record.disconnected, record.status = True, 499
            raise
        except Exception:
            record.status = 500
            raise
        finally:
            if not handed_to_relay:
                await uninterrupted(finish(record))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await serve("chat", request)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await serve("completions", request)

    app.add_middleware(_HeaderLimit, max_bytes=config.router.max_header_bytes)
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
