"""Hand-written doubles for the unit tests of the router.

The router reaches each model through the production ``HandleModelClient`` over a
``ReplicaHandle`` (``tests/fake_handle.py``): a stand-in for Ray's transport in front
of a real ``ModelDeployment`` whose engine is a ``FakeEngine``. The handle can fail as
Serve does (back-pressure, a dead replica mid-stream). ``FakeStatusSource`` stands
where the Ray Serve status board stands, and ``RecordingMetrics`` where the Ray
metrics do.
"""

from __future__ import annotations

import asyncio
import json
import tempfile
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from starlette.types import Message

from llm_fleet.deployments.config import FleetConfig, ModelConfig
from llm_fleet.router.accounting import RequestRecord
from llm_fleet.router.app import MetricsText, create_app
from llm_fleet.router.auth import KeyRing
from llm_fleet.router.drain import Drain
from llm_fleet.router.model_client import HandleModelClient, ModelClient
from llm_fleet.router.model_status import ModelStatus, State
from llm_fleet.router.quota import QuotaBackend
from llm_fleet.router.tracing import RequestTracer
from tests.fake_engine import FakeEngine
from tests.fake_handle import ReplicaHandle, start_replica

CHAT_MODEL = "smollm2-135m-instruct"
COMPLETIONS_MODEL = "gemma-3-270m"
# Configured but given no client: what LLM_ALLOWED_MODELS leaves out.
NOT_ALLOWED_MODEL = "llama-not-allowed"
DEFAULT_MAX_TOKENS = 12  # not vLLM's completions default (16), so a test tells them apart
MAX_TOKENS_LIMIT = 64
MAX_MODEL_LEN = 256


def fake_weights() -> Path:
    """A local model folder for replicas of the fake engine: a ``config.json`` and an
    empty safetensors file (the fake reads no weights). One per test process, removed
    at exit."""
    global _weights
    if _weights is None:
        _weights = tempfile.TemporaryDirectory(prefix="llm-fleet-fake-weights-")
        (Path(_weights.name) / "config.json").write_text("{}")
        (Path(_weights.name) / "model.safetensors").write_bytes(b"")
    return Path(_weights.name)


_weights: tempfile.TemporaryDirectory[str] | None = None


def replica_client(
    model: ModelConfig, engine: FakeEngine, **handle_options: Any
) -> tuple[HandleModelClient, ReplicaHandle]:
    """The production client over a handle to a real ``ModelDeployment`` of ``engine``;
    ``handle_options`` go to ``ReplicaHandle`` (refusals, a dead replica, queueing)."""
    handle = ReplicaHandle(start_replica(model, engine, fake_weights()), **handle_options)
    return HandleModelClient(model.id, handle), handle  # type: ignore[arg-type]


class FakeStatusSource:
    """A ``ModelStatusSource`` whose statuses a test sets; it records ``wake`` calls.

    ``wait_ready`` waits ``ready_after_s[model]`` and then flips that model to ready
    (if that is within the timeout), else waits the whole timeout and returns the
    status unchanged, as the real board does when no poll brings news.
    """

    def __init__(self) -> None:
        self.statuses: dict[str, ModelStatus] = {}
        self.ready_after_s: dict[str, float] = {}
        self.woken: list[str] = []
        self.waited: list[tuple[str, float]] = []

    def set(
        self,
        model_id: str,
        state: State,
        *,
        reason: str | None = None,
        min_replicas: int = 1,
        max_replicas: int = 2,
    ) -> ModelStatus:
        running = 1 if state == "ready" else 0
        starting = 1 if state in ("downloading", "loading") else 0
        status = ModelStatus(
            model=model_id,
            state=state,
            min_replicas=min_replicas,
            max_replicas=max_replicas,
            running=running,
            starting=starting,
            reason=reason,
        )
        self.statuses[model_id] = status
        return status

    def status(self, model_id: str) -> ModelStatus | None:
        return self.statuses.get(model_id)

    def snapshot(self) -> dict[str, ModelStatus]:
        return dict(self.statuses)

    def wake(self, model_id: str) -> None:
        self.woken.append(model_id)

    async def wait_ready(self, model_id: str, timeout_s: float) -> ModelStatus | None:
        self.waited.append((model_id, timeout_s))
        flip_after = self.ready_after_s.get(model_id)
        if flip_after is None or flip_after > timeout_s:
            await asyncio.sleep(timeout_s)
            return self.statuses.get(model_id)
        await asyncio.sleep(flip_after)
        current = self.statuses[model_id]
        return self.set(
            model_id,
            "ready",
            min_replicas=current.min_replicas,
            max_replicas=current.max_replicas,
        )


class RecordingMetrics:
    """A ``RouterMetrics`` that keeps what it is given, in order."""

    def __init__(self) -> None:
        self.dispatched: list[RequestRecord] = []
        self.finished: list[RequestRecord] = []
        self.model_updates: list[dict[str, ModelStatus]] = []

    def request_dispatched(self, record: RequestRecord) -> None:
        self.dispatched.append(record)

    def request_finished(self, record: RequestRecord) -> None:
        self.finished.append(record)

    def models_updated(self, statuses: Mapping[str, ModelStatus]) -> None:
        self.model_updates.append(dict(statuses))


def fleet_config(
    *, model_fields: Mapping[str, Mapping[str, Any]] | None = None, **router: Any
) -> FleetConfig:
    """Three configured models (one not allowed) with small token limits.

    ``model_fields`` adds ``ModelConfig`` fields per model id (e.g. ``unavailable``).
    """
    limits = {"default_max_tokens": DEFAULT_MAX_TOKENS, "max_tokens_limit": MAX_TOKENS_LIMIT}
    extra = model_fields or {}
    models = [
        {
            "id": model_id,
            "source": f"embedded://{model_id}",
            "limits": limits,
            **extra.get(model_id, {}),
        }
        for model_id in (CHAT_MODEL, COMPLETIONS_MODEL, NOT_ALLOWED_MODEL)
    ]
    return FleetConfig.model_validate({"models": models, "router": router})


@dataclass
class Fleet:
    """The app under test and the fakes behind it."""

    app: FastAPI
    engines: dict[str, FakeEngine] = field(default_factory=dict)
    handles: dict[str, ReplicaHandle] = field(default_factory=dict)

    async def unfinished(self) -> int:
        return sum([await engine.num_unfinished_requests() for engine in self.engines.values()])


def make_fleet(
    *,
    token_delay_s: float = 0.0,
    handle_options: dict[str, Any] | None = None,
    extra_clients: Mapping[str, ModelClient] | None = None,
    model_fields: Mapping[str, Mapping[str, Any]] | None = None,
    status: FakeStatusSource | None = None,
    metrics: RecordingMetrics | None = None,
    metrics_text: MetricsText | None = None,
    keys: KeyRing | None = None,
    quota: QuotaBackend | None = None,
    drain: Drain | None = None,
    tracer: RequestTracer | None = None,
    **router: Any,
) -> Fleet:
    """The router app over fake engines for the allowed models.

    ``handle_options`` go to every ``ReplicaHandle`` (e.g. a refusal to raise);
    ``extra_clients`` add or replace model clients;
    ``model_fields`` add per-model config fields (see ``fleet_config``); ``status``,
    ``metrics``, ``metrics_text``, ``keys``, ``quota``, ``drain`` and ``tracer`` go to
    ``create_app``;
    ``router`` overrides ``RouterConfig`` fields.
    """
    engines = {
        model_id: FakeEngine(model_id, max_model_len=MAX_MODEL_LEN, token_delay_s=token_delay_s)
        for model_id in (CHAT_MODEL, COMPLETIONS_MODEL)
    }
    config = fleet_config(model_fields=model_fields, **router)
    clients: dict[str, ModelClient] = {}
    handles: dict[str, ReplicaHandle] = {}
    for model in config.models:
        if model.id in engines:
            clients[model.id], handles[model.id] = replica_client(
                model, engines[model.id], **(handle_options or {})
            )
            for adapter in model.adapters:  # the same replica, as the router does
                clients[adapter.id] = HandleModelClient(adapter.id, handles[model.id])  # type: ignore[arg-type]
    clients.update(extra_clients or {})
    app = create_app(
        config,
        clients,
        status=status,
        metrics=metrics,
        metrics_text=metrics_text,
        keys=keys,
        quota=quota,
        drain=drain,
        tracer=tracer,
    )
    return Fleet(app=app, engines=engines, handles=handles)


def post_scope(path: str, headers: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The ASGI scope of a JSON POST to ``path`` with ``headers``."""
    extra = [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"application/json"), *extra],
        "client": ("127.0.0.1", 50000),
        "server": ("testserver", 80),
    }


async def post_then_leave(
    app: FastAPI,
    path: str,
    body: dict[str, Any],
    leave_after_s: float,
    on_leave: Callable[[], Awaitable[None]] | None = None,
    headers: Mapping[str, str] | None = None,
) -> list[Message]:
    """POST ``body`` over raw ASGI, then report ``http.disconnect`` after a delay, as
    uvicorn does when the socket closes; ``on_leave`` runs just before; ``headers`` are
    sent besides the content ones. Returns what the app sent."""

    async def leave() -> Message:
        await asyncio.sleep(leave_after_s)
        if on_leave is not None:
            await on_leave()
        return {"type": "http.disconnect"}

    channel = AsgiChannel(body, after_body=leave)
    headers = {"content-length": str(len(channel.raw)), **(headers or {})}
    scope = post_scope(path, headers)
    await asyncio.wait_for(app(scope, channel.receive, channel.send), timeout=10)
    return channel.sent


class AsgiChannel:
    """The server's side of one POST over raw ASGI: ``receive`` hands over ``body``,
    then whatever ``after_body`` returns (by default: nothing, ever, as for a client
    that stays); ``send`` keeps what the app sent, in ``sent``."""

    def __init__(
        self, body: dict[str, Any], after_body: Callable[[], Awaitable[Message]] | None = None
    ) -> None:
        self.raw = json.dumps(body).encode()
        self.sent: list[Message] = []
        self._after_body = after_body or _never
        self._body_read = False

    async def receive(self) -> Message:
        if not self._body_read:
            self._body_read = True
            return {"type": "http.request", "body": self.raw, "more_body": False}
        return await self._after_body()

    async def send(self, message: Message) -> None:
        self.sent.append(message)


async def _never() -> Message:
    await asyncio.Event().wait()
    raise AssertionError("unreachable")
