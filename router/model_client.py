"""How the router reaches a model: the engine contract over a Ray Serve handle.

``ModelClient`` is what the FastAPI app depends on; ``HandleModelClient`` is the
real one. Unit tests plug in a client over the fake engine, so the app above runs
unchanged. Closing the stream early (a client disconnect) cancels the request in
the replica, which aborts the generation in vLLM.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, Literal, Protocol, cast

from llm_fleet.deployments.engine import EngineRequest, Reply, Route
from llm_fleet.router.api_errors import (
    InternalServerError,
    ReplicaLostError,
    ServiceUnavailableError,
)

if TYPE_CHECKING:
    from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator


logger = logging.getLogger(__name__)


def replica_lost(exc: BaseException) -> bool:
    """Whether ``exc`` says the model replica died under the call (its actor or node is
    gone), rather than that the request failed in a live replica."""
    from ray.exceptions import NodeDiedError, RayActorError  # ActorDiedError is a RayActorError

    return isinstance(exc, RayActorError | NodeDiedError)


def prefix_key(route: Route, body: dict[str, Any], chars: int) -> str:
    """A short hash of the first ``chars`` characters of the request's prompt: the roles
    and text of its messages in order (chat), or its prompt (completions)."""
    if route == "chat":
        parts = []
        for message in body.get("messages") or []:
            if isinstance(message, dict):
                content = message.get("content")
                text = content if isinstance(content, str) else json.dumps(content)
                parts.append(f"{message.get('role')}\x1f{text}\x1e")
        start = "".join(parts)[:chars]
    else:
        prompt = body.get("prompt")
        start = (prompt if isinstance(prompt, str) else json.dumps(prompt))[:chars]
    return hashlib.blake2b(start.encode("utf-8", "surrogatepass"), digest_size=8).hexdigest()


# How many times a request is sent again when its replica died before answering.
REPLICA_LOST_RETRIES = 2


class ModelClient(Protocol):
    def stream(
        self, route: Route, body: dict[str, Any], request_id: str
    ) -> AsyncIterator[str | Reply]:
        """Send one request; yields what the engine contract yields."""
        ...


class HandleModelClient:
    """A ``ModelClient`` over a streaming Ray Serve deployment handle."""

    def __init__(
        self,
        model_id: str,
        handle: DeploymentHandle[Any],
        caller: str | None = None,
        transport: Literal["actor", "grpc"] = "actor",
        affinity_chars: int | None = None,
    ):
        self._model_id = model_id
        # Prefix-affine routing: the prompt's first characters key the replica.
        self._affinity_chars = affinity_chars
        if transport == "grpc":
            # Serve's replica-to-replica gRPC channel; items travel pickled, by value.
            handle = handle.options(
                _by_reference=False, request_serialization="pickle", response_serialization="pickle"
            )
        self._handle = handle.options(stream=True)
        # This router replica's actor name: the model replica stops generating for it
        # if it dies (deployments/caller_watch.py).
        self._caller = caller

    async def stream(
        self, route: Route, body: dict[str, Any], request_id: str
    ) -> AsyncIterator[str | Reply]:
        """The call's items. A replica lost before it sent anything (its node died just
        as Serve handed it the request) is not the client's problem: the call is made
        again, up to ``REPLICA_LOST_RETRIES`` times, and Serve, which marked that replica
        unavailable, sends it to another. Once an item has gone out, it is a 503
        ``replica_lost`` (an error frame, mid-stream). One generator: the relay is hot."""
        from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

        handle = self._handle
        if self._affinity_chars is not None:
            handle = handle.options(session_id=prefix_key(route, body, self._affinity_chars))
        request = EngineRequest(route, body, request_id, self._caller)
        response: DeploymentResponseGenerator[str | Reply] | None = None
        sent = False
        for attempt in range(REPLICA_LOST_RETRIES + 1):
            try:
                # Inside the try: a full queue may refuse the call itself, and an escaped
                # BackPressureError would reach the client as Serve's plain-text 503.
                response = cast(
                    "DeploymentResponseGenerator[str | Reply]", handle.generate.remote(request)
                )
                async for item in response:
                    sent = True
                    yield item
                return
            except (BackPressureError, DeploymentUnavailableError) as exc:
                raise ServiceUnavailableError(
                    f"Model '{self._model_id}' is at capacity; retry shortly.",
                    retry_after_s=max(1, int(getattr(exc, "retry_after_s", None) or 1)),
                ) from None
            except (GeneratorExit, asyncio.CancelledError):
                # The caller stopped early (its client left): cancel the call, which
                # aborts the generation. Only here: Serve's cancel() re-raises,
                # synchronously, the error a failed call ended with (a refusal: the 503
                # above), which would then escape as Serve's plain-text 503.
                if response is not None:
                    with contextlib.suppress(BackPressureError, DeploymentUnavailableError):
                        response.cancel()  # type: ignore[no-untyped-call]
                raise
            except Exception as exc:
                # The detail goes to the log, never to the client.
                logger.warning(
                    "request %s to model %s failed: %s: %s",
                    request_id,
                    self._model_id,
                    type(exc).__name__,
                    (str(exc).splitlines() or [""])[0][:300],  # Ray's first line, not its trace
                )
                if not replica_lost(exc):
                    raise InternalServerError(
                        f"model {self._model_id}: {type(exc).__name__}"
                    ) from exc
                if sent or attempt == REPLICA_LOST_RETRIES:
                    raise ReplicaLostError(self._model_id) from exc
                logger.warning(
                    "request %s: its replica was lost before answering; sent again", request_id
                )
