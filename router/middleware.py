"""ASGI middleware of the gateway's own (request ids: ``router/request_id.py``)."""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

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
