"""The request pipeline: one chat or completions request, from its HTTP body to the
engine's answer, as named steps in the order they run (:meth:`Pipeline.run`):

0. ``drain.refuse_if_draining``: a gateway about to shut down takes no new request
   (``router/drain.py``), 503;
1. ``authenticate``: the caller's API key (``router/auth.py``), or 401;
   then ``gate.take``: a slot in the gateway-wide cap (``router.max_concurrent_requests``,
   counted with the quotas), or 429 ``gateway_busy``;
2. ``read_json`` and ``parse_request``: the body, size-capped, and the OpenAI fields the
   router checks (``router/protocol.py``), or 400/413/415;
3. ``resolve_model``: the model, if the fleet serves it and the key may use it
   (the allowlist), or 404;
4. ``apply_request_limits``: the caps on fields that multiply work and the output
   token budget (``router/request_limits.py``), or 400;
5. ``hold.take``: the key's quota, rpm, tpm and concurrency (``router/quota.py``), or 429;
6. ``await_readiness``: the model can take a request (``router/readiness.py``), or 503;
7. ``forward``: the model deployment's stream (``router/model_client.py``) and its first
   item, watched for the client leaving, the model going down and the deadline;
8. ``whole_answer`` (one JSON body) or ``stream_response`` (SSE, ``router/relay.py``).

:meth:`Pipeline.handle` wraps the steps: it owns the request's record (metrics, the
access line, the trace span) and its key's hold, and closes both out once however the request ends.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Mapping
from typing import TYPE_CHECKING, Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from llm_fleet.deployments.config import FleetConfig, ModelConfig
from llm_fleet.deployments.engine import Reply, Route
from llm_fleet.router.accounting import RequestRecord, log_request, uninterrupted
from llm_fleet.router.api_errors import (
    APIError,
    InternalServerError,
    ModelNotFoundError,
    api_error_from_engine,
)
from llm_fleet.router.auth import KeyRing, Principal
from llm_fleet.router.drain import Drain
from llm_fleet.router.errors import error_response
from llm_fleet.router.guards import ClientDisconnected, Deadline, unless_disconnected
from llm_fleet.router.inference_api import ApiShape
from llm_fleet.router.metrics import RouterMetrics
from llm_fleet.router.model_client import ModelClient
from llm_fleet.router.model_status import ModelStatusSource
from llm_fleet.router.protocol import parse_request, read_json
from llm_fleet.router.quota import GatewayHold, QuotaBackend, QuotaHold, gateway_principal
from llm_fleet.router.readiness import await_readiness, watch_readiness
from llm_fleet.router.relay import Finish, stream_response
from llm_fleet.router.request_id import request_id_of
from llm_fleet.router.request_limits import apply_token_limits, check_request_limits, output_budget
from llm_fleet.router.sse import UsageTap, ask_for_usage

if TYPE_CHECKING:
    from llm_fleet.router.tracing import RequestTracer

logger = logging.getLogger(__name__)


class Pipeline:
    """The steps above over one fleet's models, keys, quota backend and status board."""

    def __init__(
        self,
        config: FleetConfig,
        clients: Mapping[str, ModelClient],
        *,
        source: ModelStatusSource,
        recorder: RouterMetrics,
        quota: QuotaBackend,
        keys: KeyRing | None,
        drain: Drain | None = None,
        tracer: RequestTracer | None = None,
    ) -> None:
        self.config, self.clients = config, dict(clients)
        # The models and their adapters (each under its own id) that have a client.
        served = {k: v for m in config.models for k, v in {m.id: m, **m.adapter_views()}.items()}
        self.models: dict[str, ModelConfig] = {k: v for k, v in served.items() if k in clients}
        self.source, self.recorder, self.quota, self.keys = source, recorder, quota, keys
        self.drain = drain or Drain(None)
        self.gateway = gateway_principal(config.router.max_concurrent_requests)
        self.tracer = tracer

    def add_model(self, model: ModelConfig, client: ModelClient) -> None:
        """Serve ``model`` from now on (a model app the router found), or its new config."""
        self.clients[model.id] = client
        self.models[model.id] = model

    def remove_model(self, model_id: str) -> None:
        """Stop serving ``model_id``: new requests get 404; those in flight finish."""
        self.models.pop(model_id, None)
        self.clients.pop(model_id, None)

    def authenticate(self, request: Request) -> Principal | None:
        """The request's principal; with keys, none is a 401. Without keys: None."""
        if self.keys is None:
            return None
        return self.keys.require(request.headers.get("authorization"))

    def visible(self, principal: Principal | None) -> dict[str, ModelConfig]:
        """The models ``principal`` may use (all of them without keys)."""
        if principal is None:
            return self.models
        return {m_id: m for m_id, m in self.models.items() if principal.may_use(m_id)}

    def resolve_model(self, principal: Principal | None, model_id: str) -> ModelConfig:
        """The model asked for; one the key may not use is as unknown as a missing one."""
        model = self.visible(principal).get(model_id)
        if model is None:
            raise ModelNotFoundError(model_id)
        return model

    @staticmethod
    def apply_request_limits(
        route: Route, body: dict[str, Any], model: ModelConfig, principal: Principal | None
    ) -> dict[str, Any]:
        """The model's caps checked, and the body with its output budget settled and its
        sampling defaults (``sampling``) filled in."""
        check_request_limits(route, body, model.limits)
        key_cap = principal.limits.max_tokens if principal is not None else None
        return model.sampling.apply(apply_token_limits(route, body, model.limits, key_cap))

    def finisher(self, hold: QuotaHold, gate: QuotaHold, request: Request) -> Finish:
        """Finish a record once: metrics, the access line, its trace span (with tracing
        on; ``request``'s headers may hold the caller's ``traceparent``), its key's quota
        and its slot in the gateway-wide cap released."""

        async def finish(record: RequestRecord) -> None:
            if record.finished_at is not None:
                return
            record.finish()  # first, and with no await before: finished exactly once
            self.drain.finished()
            self.recorder.request_finished(record)
            log_request(record)
            if self.tracer is not None:
                self.tracer.request_finished(record, request.headers)
            # A release with nothing held (no keys, no cap: the default) is skipped here,
            # not in a task of its own: the common path makes no task at all.
            if hold.held:
                await uninterrupted(hold.release(record.tokens_used))
            if gate.held:
                await uninterrupted(gate.release(0))

        return finish

    async def handle(
        self, route: Route, request: Request, shape: ApiShape | None = None
    ) -> Response:
        """One request, start to end: the one place its record and key hold are closed
        out, on every way it can end (an answer, an error, the client leaving before the
        answer or Serve cancelling the task), except a stream handed to its relay, which
        closes itself out when it ends (``router/relay.py``). ``shape``: an ``/api``
        endpoint's bodies (``router/inference_api.py``); the route is then its choice."""
        record = RequestRecord(request_id=request_id_of(request.scope), endpoint=route)
        hold = QuotaHold(self.quota, None)
        gate = GatewayHold(self.quota, self.gateway)
        finish = self.finisher(hold, gate, request)
        handed_to_relay = False
        self.drain.started()
        try:
            self.drain.refuse_if_draining()
            hold.principal = self.authenticate(request)
            record.key = hold.principal.id if hold.principal is not None else None
            await gate.take()
            response, handed_to_relay = await self.run(route, request, record, hold, finish, shape)
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

    async def run(
        self,
        route: Route,
        request: Request,
        record: RequestRecord,
        hold: QuotaHold,
        finish: Finish,
        shape: ApiShape | None = None,
    ) -> tuple[Response, bool]:
        """Steps 2 to 8 (the module docstring). Returns the response, and whether it is a
        stream that finishes its own record when it ends."""
        deadline = Deadline(self.config.router.request_timeout_s)
        self.drain.track(deadline)
        body = await read_json(request, self.config.router.max_request_bytes)
        if shape is not None:
            route, body = shape.openai_request(body, self.models)
            record.endpoint, record.path = route, shape.path
        parsed = parse_request(route, body)
        model = self.resolve_model(hold.principal, parsed.model)
        record.model, record.stream = model.id, bool(parsed.stream)
        body = self.apply_request_limits(route, body, model, hold.principal)
        await hold.take(output_budget(route, body))
        await unless_disconnected(request, await_readiness(model, self.source))
        body, drop_usage = ask_for_usage(body)
        stream, first = await self.forward(request, route, model, body, record, deadline)
        if isinstance(first, Reply):
            return await self.whole_answer(first, stream, record, shape), False
        tap = shape.tap() if shape is not None else UsageTap(drop_usage)
        return stream_response(first, stream, record, tap, finish, deadline), True

    async def forward(
        self,
        request: Request,
        route: Route,
        model: ModelConfig,
        body: dict[str, Any],
        record: RequestRecord,
        deadline: Deadline,
    ) -> tuple[AsyncIterator[str | Reply], str | Reply]:
        """Send the request to the model; its stream and first item (a whole answer is
        one item), awaited while the client stays, the model stays up and time is left."""
        client = self.clients.get(model.id)
        if client is None:  # its model app was removed since the request was admitted
            raise ModelNotFoundError(model.id)
        record.dispatched()
        self.recorder.request_dispatched(record)
        stream = client.stream(route, body, record.request_id)
        first_item = deadline.within(anext(stream))
        try:
            first = await unless_disconnected(
                request, first_item, watch_readiness(model, self.source)
            )
        except StopAsyncIteration:
            raise InternalServerError(f"model {model.id} returned nothing") from None
        record.replied_at = time.perf_counter()
        return stream, first

    @staticmethod
    async def whole_answer(
        reply: Reply,
        stream: AsyncIterator[str | Reply],
        record: RequestRecord,
        shape: ApiShape | None = None,
    ) -> Response:
        """A non-streamed answer as JSON; an engine error as the matching APIError."""
        await stream.aclose()  # type: ignore[attr-defined]
        record.engine_s = reply.engine_s
        if reply.error is not None:
            raise api_error_from_engine(reply.error)
        record.usage(reply.body.get("usage"))
        headers = {"Server-Timing": record.server_timing()}
        body = shape.answer(reply.body) if shape is not None else reply.body
        return JSONResponse(body, status_code=reply.status, headers=headers)
