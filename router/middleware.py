"""ASGI middleware of the gateway's own (request ids: ``router/request_id.py``)."""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from llm_fleet.router.api_errors import HeadersTooLargeError
from llm_fleet.router.errors import error_response
from llm_fleet.router.request_id import request_id_of


class HeaderLimit:
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


# Under Serve's gRPC proxy channel (RAY_SERVE_PROXY_USE_GRPC=1, which the launcher sets)
# each ASGI message is one gRPC message, and gRPC refuses those over 4 MiB: the proxy
# then answers a bare-text 500. Seen: a node's /metrics text of 4.3 MB.
MAX_BODY_MESSAGE_BYTES = 1 << 20


class BodyChunks:
    """Sends a response body larger than ``max_bytes`` as several body messages of at
    most ``max_bytes`` each (the bytes, headers and Content-Length unchanged)."""

    def __init__(self, app: ASGIApp, max_bytes: int = MAX_BODY_MESSAGE_BYTES) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_in_chunks(message: Message) -> None:
            body = message.get("body", b"")
            if message["type"] != "http.response.body" or len(body) <= self.max_bytes:
                await send(message)
                return
            more = message.get("more_body", False)
            for start in range(0, len(body), self.max_bytes):
                end = start + self.max_bytes
                last = end >= len(body)
                chunk = body[start:end]
                await send(
                    {"type": "http.response.body", "body": chunk, "more_body": more or not last}
                )

        await self.app(scope, receive, send_in_chunks)
