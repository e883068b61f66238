"""Every way a request ends closes it out once: its key's slot and tokens released, the
in-flight gauge back down, the access line written, the generation stopped.

The app is driven over raw ASGI, and the cancellations are the ones it really meets:
Ray Serve cancels a request's task when its HTTP client leaves, and Starlette's
streaming response runs the relay in an anyio task group, whose cancellation hits every
later await (so the test cancels the task again and again, as anyio does).
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.types import Message

from llm_fleet.router.accounting import RequestRecord
from llm_fleet.router.auth import KeyRing, Principal
from llm_fleet.router.keys_file import create_key
from llm_fleet.router.quota import LOCAL_HOLDER, Admission, LocalQuota
from tests.fakes import (
    AsgiChannel,
    Fleet,
    RecordingMetrics,
    make_fleet,
    post_scope,
)
from tests.unit.ops_helpers import CHAT_PATH, chat, openai_error, sse_payloads


class SlowQuota(LocalQuota):
    """LocalQuota whose calls take a while, as the shared limits actor's do; it keeps
    what was released."""

    def __init__(self, admit_s: float = 0.0, release_s: float = 0.0) -> None:
        super().__init__()
        self.admit_s, self.release_s = admit_s, release_s
        self.released: list[int] = []

    async def admit(
        self, principal: Principal, est_tokens: int, holder: str = LOCAL_HOLDER
    ) -> Admission:
        await asyncio.sleep(self.admit_s)
        return await super().admit(principal, est_tokens, holder)

    async def release(
        self, principal: Principal, tokens_used: int, holder: str = LOCAL_HOLDER
    ) -> None:
        await asyncio.sleep(self.release_s)
        self.released.append(tokens_used)
        await super().release(principal, tokens_used, holder)

    def in_flight(self) -> int:
        return sum(key["in_flight"] for key in self.snapshot()["keys"].values())


def keyed(tmp_path: Path, limits: LocalQuota, **fleet: Any) -> tuple[Fleet, dict[str, str]]:
    path = tmp_path / "keys.yaml"
    key = create_key(path, "limited", concurrency=1)
    app = make_fleet(keys=KeyRing.from_file(path), quota=limits, **fleet)
    return app, {"Authorization": f"Bearer {key}"}


async def _cancelled_while_running(
    fleet: Fleet, body: dict[str, Any], headers: dict[str, str], after_s: float
) -> list[Message]:
    """Run one request whose client never leaves, cancel its task after ``after_s`` as
    Serve does, then keep cancelling it until it ends, as an anyio scope does."""
    channel = AsgiChannel(body)
    scope = post_scope(CHAT_PATH, headers)
    task = asyncio.create_task(fleet.app(scope, channel.receive, channel.send))
    await asyncio.sleep(after_s)
    while not task.done():
        task.cancel()
        await asyncio.sleep(0.005)
    return channel.sent


async def _settled(limits: SlowQuota, fleet: Fleet, timeout_s: float = 3.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while limits.in_flight() or await fleet.unfinished():
        if asyncio.get_running_loop().time() > deadline:
            return
        await asyncio.sleep(0.02)


@pytest.mark.parametrize(
    ("where", "body", "after_s"),
    [
        # The key's admission is still in the backend (the actor call).
        ("admitting", chat("a b c"), 0.05),
        # Waiting for a whole answer.
        ("generating", chat("a b c", max_tokens=40, ignore_eos=True), 0.4),
        # Mid-stream: the relay's own closing out is cancelled too.
        ("streaming", chat("a b c", max_tokens=40, ignore_eos=True, stream=True), 0.4),
    ],
)
def test_a_request_cancelled_anywhere_frees_its_slot_and_gauge(
    tmp_path: Path, where: str, body: dict[str, Any], after_s: float
) -> None:
    limits = SlowQuota(admit_s=0.2 if where == "admitting" else 0.0, release_s=0.1)
    metrics = RecordingMetrics()
    fleet, headers = keyed(tmp_path, limits, metrics=metrics, token_delay_s=0.05)

    async def scenario() -> None:
        await _cancelled_while_running(fleet, body, headers, after_s)
        await asyncio.sleep(limits.admit_s + limits.release_s + 0.1)  # closing out, if any
        await _settled(limits, fleet)

    asyncio.run(scenario())
    assert limits.in_flight() == 0
    assert asyncio.run(fleet.unfinished()) == 0  # the generation stopped
    if where == "admitting":
        assert limits.released == [0]  # the admission came after the cancel: given back
        assert metrics.dispatched == []
    else:
        assert len(limits.released) == 1
        assert [r.request_id for r in metrics.finished] == [
            r.request_id for r in metrics.dispatched
        ]
        [record] = metrics.finished
        assert (record.status, record.disconnected) == (499, True)


def test_a_client_closing_on_done_is_a_whole_answer(tmp_path: Path) -> None:
    """SDKs close the connection once ``[DONE]`` arrives: the relay ends there, so the
    request is a 200 with its tokens charged, not a 499."""
    limits, metrics = SlowQuota(), RecordingMetrics()
    # A Serve handle stream's end arrives after vLLM's ``[DONE]``: here 2 s after.
    lingering = {"end_lag_s": 2.0}
    fleet, headers = keyed(
        tmp_path, limits, metrics=metrics, token_delay_s=0.01, handle_options=lingering
    )
    raw = json.dumps(chat("a b c", stream=True)).encode()
    sent: list[Message] = []
    done = asyncio.Event()
    calls = 0

    async def receive() -> Message:
        nonlocal calls
        calls += 1
        if calls == 1:
            return {"type": "http.request", "body": raw, "more_body": False}
        await done.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)
        if b"[DONE]" in message.get("body", b""):
            done.set()

    async def scenario() -> float:
        started = asyncio.get_running_loop().time()
        await asyncio.wait_for(fleet.app(post_scope(CHAT_PATH, headers), receive, send), 5)
        return asyncio.get_running_loop().time() - started

    elapsed = asyncio.run(scenario())
    assert elapsed < 1.0  # it did not wait for the model stream's lingering end
    [record] = metrics.finished
    assert isinstance(record, RequestRecord)
    assert (record.status, record.disconnected) == (200, False)
    assert limits.in_flight() == 0
    assert limits.released == [record.tokens_used] and record.tokens_used > 0


# --- router.request_timeout_s ------------------------------------------------------------


def _timed_out_fleet(timeout_s: float | None) -> tuple[Fleet, RecordingMetrics]:
    metrics = RecordingMetrics()
    fleet = make_fleet(metrics=metrics, token_delay_s=0.1, request_timeout_s=timeout_s)
    return fleet, metrics


async def _post(fleet: Fleet, body: dict[str, Any]) -> tuple[httpx.Response, float, int]:
    transport = httpx.ASGITransport(app=fleet.app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
        started = time.monotonic()
        response = await http.post(CHAT_PATH, json=body)
        took = time.monotonic() - started
    await asyncio.sleep(0.1)
    return response, took, await fleet.unfinished()


LONG = chat("a b c", max_tokens=40, ignore_eos=True)  # 4 s at 0.1 s a token


def test_a_whole_answer_past_the_timeout_is_504_and_its_generation_stops() -> None:
    fleet, metrics = _timed_out_fleet(0.5)
    response, took, unfinished = asyncio.run(_post(fleet, LONG))
    error = openai_error(response, 504, "request_timeout")
    assert error["type"] == "timeout_error"
    assert "within 0.5 s (router.request_timeout_s)" in error["message"]
    assert 0.5 <= took < 2.0
    assert unfinished == 0
    [record] = metrics.finished
    assert record.status == 504


def test_a_stream_past_the_timeout_ends_with_its_error_frame() -> None:
    fleet, metrics = _timed_out_fleet(0.5)
    response, took, unfinished = asyncio.run(_post(fleet, {**LONG, "stream": True}))
    assert response.status_code == 200  # the stream had started
    chunks = sse_payloads(response)
    assert any(c.get("choices") for c in chunks[:-1])  # it relayed frames first
    assert chunks[-1]["error"]["code"] == "request_timeout"
    assert took < 2.0
    assert unfinished == 0
    [record] = metrics.finished
    assert record.status == 504


def test_without_a_timeout_a_long_answer_runs_to_its_end() -> None:
    fleet, _ = _timed_out_fleet(None)
    body = chat("a b c", max_tokens=8, ignore_eos=True)
    response, _, _ = asyncio.run(_post(fleet, body))
    assert response.status_code == 200
    assert response.json()["usage"]["completion_tokens"] == 8
