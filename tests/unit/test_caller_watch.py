"""A model replica stops generating for a router replica that died."""

from __future__ import annotations

import asyncio

import pytest

from llm_fleet.deployments.caller_watch import CallerWatch
from tests.fake_engine import FakeEngine
from tests.fake_time import FakeTime

# ignore_eos: the fake repeats its words until max_tokens, as a long answer would.
CHAT = {
    "model": "fake",
    "messages": [{"role": "user", "content": "Hi"}],
    "stream": True,
    "max_tokens": 500,
    "ignore_eos": True,
}


class Callers:
    """Which callers are alive, and how often each was asked about."""

    def __init__(self, *alive: str) -> None:
        self.alive = set(alive)
        self.asked: list[str] = []

    def is_alive(self, caller: str) -> bool:
        self.asked.append(caller)
        return caller in self.alive


async def _stream(engine: FakeEngine, watch: CallerWatch, caller: str) -> int:
    """A replica's generate: the engine's stream, watched for ``caller``."""
    untrack = watch.track(caller)
    frames = 0
    try:
        async for _ in engine.generate("chat", CHAT, f"r-{caller}"):
            frames += 1
    finally:
        untrack()
    return frames


def test_the_requests_of_a_dead_caller_are_aborted_and_the_others_go_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    callers, time = Callers("router-a", "router-b"), FakeTime()
    engine = FakeEngine(token_delay_s=0.002)  # a stream lasts about 1 s (real time)

    async def scenario() -> tuple[list[object], list[bool], int]:
        await engine.start()
        watch = CallerWatch(callers.is_alive, period_s=5.0, sleep=time.sleep)
        tasks = [
            asyncio.create_task(_stream(engine, watch, caller))
            for caller in ("router-a", "router-a", "router-b")
        ]
        await time.advance(5.0)  # one look: both alive
        callers.alive.discard("router-a")  # killed
        await time.advance(4.9)  # the next look is a whole period after the last one
        going = [not task.done() for task in tasks]
        await time.advance(0.1)
        done = await asyncio.gather(*tasks, return_exceptions=True)
        unfinished = await engine.num_unfinished_requests()
        await watch.stop()
        return done, going, unfinished

    done, going, unfinished = run(scenario())
    assert going == [True, True, True]
    assert [type(d).__name__ for d in done[:2]] == ["CancelledError", "CancelledError"]
    assert done[2] == 1 + 500 + 1  # router-b's stream ran to the end: role, tokens, [DONE]
    assert unfinished == 0  # the engine counts no request still generating
    assert "caller router-a is gone: aborting its 2 request(s) in flight" in caplog.text
    # One question per caller and period, not per request or token.
    assert callers.asked == ["router-a", "router-b", "router-a", "router-b"]


def test_with_nothing_in_flight_nobody_is_asked() -> None:
    callers, time = Callers("router-a", "router-b"), FakeTime()

    async def scenario() -> list[object]:
        watch = CallerWatch(callers.is_alive, period_s=5.0, sleep=time.sleep)
        untrack = watch.track("router-a")
        await time.advance(5.0)
        untrack()
        await time.advance(5.0)  # the watch wakes, finds nothing tracked and ends
        seen: list[object] = [list(callers.asked), time.sleeping]
        await time.advance(60.0)
        seen.append(list(callers.asked))
        untrack = watch.track("router-b")  # the next request starts it again
        await time.advance(5.0)
        seen.append(list(callers.asked))
        untrack()
        await watch.stop()
        return seen

    assert run(scenario()) == [
        ["router-a"],
        0,
        ["router-a"],
        ["router-a", "router-b"],
    ]


def run(coroutine: object) -> object:
    return asyncio.run(coroutine)  # type: ignore[arg-type]
