"""Draining before a shutdown (``router/drain.py``): once the drain folder says so, new
requests get 503 ``shutting_down``, readiness 503, and requests in flight go on until the
drain's end, then end as timed out (their generation stopped); a busy file says when
the replica still has requests in flight."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import httpx

from llm_fleet.router.drain import DRAIN_FILE, Drain, read_drain_end
from tests.fake_time import FakeTime
from tests.fakes import Fleet, make_fleet
from tests.unit.ops_helpers import CHAT_PATH, chat


def _drain_at(folder: Path, seconds_from_now: float) -> None:
    (folder / DRAIN_FILE).write_text(f"{time.time() + seconds_from_now}\n")


def _busy(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("busy-*"))


async def _scenario(
    fleet: Fleet, drain: Drain, folder: Path, *, grace_s: float, body: dict[str, Any]
) -> dict[str, Any]:
    """A request in flight when the drain begins, one sent after; what each got."""
    transport = httpx.ASGITransport(app=fleet.app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
        started = time.monotonic()
        in_flight = asyncio.create_task(http.post(CHAT_PATH, json=body))
        await asyncio.sleep(0.2)
        assert _busy(folder) == [] and not drain.draining
        _drain_at(folder, grace_s)
        await drain.tick()
        busy_while = _busy(folder)
        refused = await http.post(CHAT_PATH, json=chat("hi"))
        ready = await http.get("/health/ready")
        answer = await in_flight
        took = time.monotonic() - started
        await drain.tick()
        return {
            "answer": answer,
            "took": took,
            "refused": refused,
            "ready": ready,
            "busy_while": busy_while,
            "busy_after": _busy(folder),
            "unfinished": await fleet.unfinished(),
        }


def _long(stream: bool, tokens: int) -> dict[str, Any]:
    return chat("a b c", max_tokens=tokens, ignore_eos=True, stream=stream)


def test_a_request_in_flight_finishes_and_new_ones_are_refused(tmp_path: Path) -> None:
    drain = Drain(tmp_path)
    fleet = make_fleet(token_delay_s=0.05, drain=drain)
    seen = asyncio.run(
        _scenario(fleet, drain, tmp_path, grace_s=30, body=_long(stream=True, tokens=16))
    )
    answer = seen["answer"]
    assert answer.status_code == 200
    assert answer.text.rstrip().endswith("data: [DONE]") and '"error"' not in answer.text
    refused = seen["refused"]
    assert refused.status_code == 503
    error = refused.json()["error"]
    assert error["code"] == "shutting_down"
    assert error["request_id"] == refused.headers["x-request-id"]
    assert 1 <= int(refused.headers["retry-after"]) <= 31
    assert (seen["ready"].status_code, seen["ready"].json()["status"]) == (503, "draining")
    assert len(seen["busy_while"]) == 1 and seen["busy_after"] == []
    assert seen["unfinished"] == 0


def test_a_stream_past_the_drains_end_ends_with_an_error_frame(tmp_path: Path) -> None:
    drain = Drain(tmp_path)
    fleet = make_fleet(token_delay_s=0.05, drain=drain)
    body = _long(stream=True, tokens=60)  # 3 s of tokens; the drain gives 0.5 s
    seen = asyncio.run(_scenario(fleet, drain, tmp_path, grace_s=0.5, body=body))
    answer = seen["answer"]
    assert answer.status_code == 200  # the headers had gone
    frames = [f.removeprefix("data: ") for f in answer.text.split("\n\n") if f]
    assert frames[-1] == "[DONE]"
    assert json.loads(frames[-2])["error"]["code"] == "shutting_down"
    assert seen["took"] < 2.5
    assert seen["unfinished"] == 0  # its generation was stopped
    assert seen["busy_after"] == []


def test_a_whole_answer_past_the_drains_end_is_a_503(tmp_path: Path) -> None:
    drain = Drain(tmp_path)
    fleet = make_fleet(token_delay_s=0.05, drain=drain)
    body = _long(stream=False, tokens=60)
    seen = asyncio.run(_scenario(fleet, drain, tmp_path, grace_s=0.5, body=body))
    answer = seen["answer"]
    assert answer.status_code == 503
    assert answer.json()["error"]["code"] == "shutting_down"
    assert seen["took"] < 2.5 and seen["unfinished"] == 0


def test_without_a_drain_file_nothing_drains(tmp_path: Path) -> None:
    drain = Drain(tmp_path)
    asyncio.run(drain.tick())
    assert not drain.draining
    assert not Drain(None).draining
    assert read_drain_end(tmp_path) is None
    (tmp_path / DRAIN_FILE).write_text("soon")
    assert read_drain_end(tmp_path) == 0.0  # not a time: drain at once


def test_the_watch_loop_notices_the_file_within_a_period(tmp_path: Path) -> None:
    time_ = FakeTime()

    async def scenario() -> list[bool]:
        drain = Drain(tmp_path, sleep=time_.sleep, period_s=0.2)
        await drain.start()
        try:
            await time_.advance(0.2)
            seen = [drain.draining]
            _drain_at(tmp_path, 10)
            await time_.advance(0.1)
            seen.append(drain.draining)  # between two looks
            await time_.advance(0.1)
            seen.append(drain.draining)
            return seen
        finally:
            await drain.stop()

    assert asyncio.run(scenario()) == [False, False, True]
