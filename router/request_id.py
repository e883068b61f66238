"""Request ids: taken from ``X-Request-Id`` when sane, else made; echoed on every response.

A pure ASGI middleware (not ``BaseHTTPMiddleware``), so streaming and cancellation
pass through untouched. Behind Ray Serve's proxy, the proxy already does both halves
(it puts the client's id, or one it makes, into the request headers and echoes it on
the response), so there the middleware only reads it (``echo=False``).
"""

from __future__ import annotations

import re
import uuid
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

HEADER = "x-request-id"
# Anything else (too long, odd characters) is replaced: the id reaches logs and headers.
_SAFE_ID = re.compile(r"^[\x21-\x7e]{1,128}$")


def new_request_id() -> str:
    return f"req-{uuid.uuid4().hex}"


def request_id_of(scope: Scope) -> str:
    state: dict[str, Any] = scope.setdefault("state", {})
    rid = state.get("request_id")
    if isinstance(rid, str):
        return rid
    for name, value in scope.get("headers", []):
        if name.decode("latin-1").lower() == HEADER:
            candidate = value.decode("latin-1")
            if _SAFE_ID.match(candidate):
                rid = candidate
                break
    state["request_id"] = rid or new_request_id()
    return str(state["request_id"])


class RequestIdMiddleware:
    def __init__(self, app: ASGIApp, echo: bool = True):
        self.app = app
        self.echo = echo

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = request_id_of(scope).encode("latin-1")
        if not self.echo:
            await self.app(scope, receive, send)
            return

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [
                    (k, v) for k, v in message.get("headers", []) if k.lower() != b"x-request-id"
                ]
                headers.append((b"x-request-id", rid))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_id)
