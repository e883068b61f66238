"""``BodyChunks``: no response body message over 1 MiB leaves the app (Serve's gRPC proxy
channel refuses messages over 4 MiB with a bare-text 500; a node's /metrics text was
4.3 MB), and the bytes a client gets are the same."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import FastAPI
from fastapi.responses import Response
from fastapi.testclient import TestClient
from starlette.types import Message

from llm_fleet.router.middleware import MAX_BODY_MESSAGE_BYTES, BodyChunks
from tests.fakes import make_fleet, post_scope

BIG = bytes(range(256)) * (5 * 4096 + 7)  # 5 MiB and a bit


def _app() -> FastAPI:
    app = FastAPI()

    @app.get("/big")
    async def big() -> Response:
        return Response(BIG, media_type="application/octet-stream")

    app.add_middleware(BodyChunks)
    return app


def _messages(app: Any, path: str) -> list[Message]:
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    scope = {**post_scope(path), "method": "GET", "headers": []}
    asyncio.run(app(scope, receive, send))
    return sent


def test_a_large_body_leaves_in_messages_of_at_most_1_mib() -> None:
    sent = _messages(_app(), "/big")
    bodies = [m for m in sent if m["type"] == "http.response.body"]
    assert len(bodies) == 6
    assert all(len(m["body"]) <= MAX_BODY_MESSAGE_BYTES for m in bodies)
    assert [m["more_body"] for m in bodies] == [True] * 5 + [False]
    assert b"".join(m["body"] for m in bodies) == BIG
    with TestClient(_app()) as http:
        response = http.get("/big")
    assert response.content == BIG
    assert response.headers["content-length"] == str(len(BIG))


def test_the_gateway_sends_a_large_metrics_text_in_chunks() -> None:
    async def scrape() -> str:
        return "x 1\n" * (2 * MAX_BODY_MESSAGE_BYTES // 4)  # 2 MiB

    sent = _messages(make_fleet(metrics_text=scrape).app, "/metrics")
    bodies = [m for m in sent if m["type"] == "http.response.body" and m.get("body")]
    assert len(bodies) == 2
    assert all(len(m["body"]) <= MAX_BODY_MESSAGE_BYTES for m in bodies)
