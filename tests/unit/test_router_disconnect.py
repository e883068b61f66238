"""A client that leaves stops its generation: the app driven over raw ASGI.

The test plays the server: ``receive`` hands over the request body, then reports
``http.disconnect`` after a delay, as uvicorn does when the socket closes.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from tests.fakes import CHAT_MODEL, MAX_TOKENS_LIMIT, Fleet, make_fleet, post_then_leave

TOKEN_DELAY_S = 0.05  # MAX_TOKENS_LIMIT tokens take ~3 s: far longer than the client stays


async def _leave_after(fleet: Fleet, body: dict[str, Any], delay_s: float) -> dict[str, Any]:
    """POST ``body``, disconnect after ``delay_s``; what was sent and seen, when it ended."""
    seen: dict[str, Any] = {}

    async def note_unfinished() -> None:
        seen.setdefault("unfinished_at_disconnect", await fleet.unfinished())

    started = time.monotonic()
    seen["sent"] = await post_then_leave(
        fleet.app, "/v1/chat/completions", body, delay_s, on_leave=note_unfinished
    )
    seen["elapsed_s"] = time.monotonic() - started
    seen["unfinished_after"] = await fleet.unfinished()
    return seen


def _long_answer(**fields: Any) -> dict[str, Any]:
    return {
        "model": CHAT_MODEL,
        "messages": [{"role": "user", "content": "count with me"}],
        "max_tokens": MAX_TOKENS_LIMIT,
        "ignore_eos": True,
        **fields,
    }


def test_leaving_before_a_non_streamed_answer_aborts_it() -> None:
    fleet = make_fleet(token_delay_s=TOKEN_DELAY_S)
    seen = asyncio.run(_leave_after(fleet, _long_answer(), delay_s=0.3))
    assert seen.get("unfinished_at_disconnect") == 1  # it was generating when the client left
    assert seen["unfinished_after"] == 0
    assert seen["elapsed_s"] < MAX_TOKENS_LIMIT * TOKEN_DELAY_S / 2
    starts = [m for m in seen["sent"] if m["type"] == "http.response.start"]
    assert [m["status"] for m in starts] == [499]


def test_leaving_a_stream_aborts_it() -> None:
    fleet = make_fleet(token_delay_s=TOKEN_DELAY_S)

    async def leave_then_settle() -> dict[str, Any]:
        seen = await _leave_after(fleet, _long_answer(stream=True), delay_s=0.3)
        deadline = time.monotonic() + 2
        while await fleet.unfinished() and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        seen["unfinished_settled"] = await fleet.unfinished()
        return seen

    seen = asyncio.run(leave_then_settle())
    assert seen.get("unfinished_at_disconnect") == 1
    assert seen["unfinished_settled"] == 0
    assert seen["elapsed_s"] < MAX_TOKENS_LIMIT * TOKEN_DELAY_S / 2
    body = b"".join(m.get("body", b"") for m in seen["sent"] if m["type"] == "http.response.body")
    assert body.startswith(b"data: ")
    assert b"[DONE]" not in body
