"""The one background loop (deployments/background.py), driven by fake time."""

from __future__ import annotations

import asyncio
import logging

import pytest

from llm_fleet.deployments.background import PeriodicLoop, stop_task
from tests.fake_time import FakeTime


def test_a_loop_ticks_once_per_period_from_start_until_stop() -> None:
    time, ticks = FakeTime(), []

    async def tick() -> None:
        ticks.append(time.now)

    async def scenario() -> tuple[bool, bool]:
        loop = PeriodicLoop("count", tick, 10.0, sleep=time.sleep)
        await time.advance(30)  # not started: nothing runs
        loop.start()
        loop.start()  # a second start while running is a no-op, not a second loop
        await time.advance(35)
        running = loop.running
        await loop.stop()
        await time.advance(30)
        return running, loop.running

    running, after_stop = asyncio.run(scenario())
    assert ticks == [1040.0, 1050.0, 1060.0]  # started at 1030: every 10 s, none at start
    assert running and not after_stop
    assert time.sleeping == 0  # stop left no task asleep


def test_a_failed_tick_is_logged_and_the_loop_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    time, ticks = FakeTime(), []
    owner = logging.getLogger("llm_fleet.test_owner")

    async def tick() -> None:
        ticks.append(time.now)
        if len(ticks) == 1:
            raise RuntimeError("one bad tick")

    async def scenario() -> None:
        loop = PeriodicLoop("the watch", tick, 1.0, sleep=time.sleep, logger=owner)
        loop.start()
        await time.advance(3)
        await loop.stop()

    asyncio.run(scenario())
    assert len(ticks) == 3
    [record] = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert record.name == "llm_fleet.test_owner"
    assert record.getMessage() == "the watch failed; retrying"
    assert record.exc_info is not None and "one bad tick" in str(record.exc_info[1])


def test_a_loop_with_nothing_to_do_ends_and_starts_again() -> None:
    time, ticks, work = FakeTime(), [], [1]

    async def tick() -> None:
        ticks.append(time.now)

    async def scenario() -> list[bool]:
        loop = PeriodicLoop("busy", tick, 1.0, while_=lambda: bool(work), sleep=time.sleep)
        loop.start()
        await time.advance(2)
        seen = [loop.running]
        work.clear()
        await time.advance(5)  # wakes once, finds nothing to do, ends without a tick
        seen.append(loop.running)
        work.append(1)
        loop.start()
        await time.advance(1)
        seen.append(loop.running)
        await loop.stop()
        return seen

    assert asyncio.run(scenario()) == [True, False, True]
    assert ticks == [1001.0, 1002.0, 1008.0]


def test_stop_ends_a_tick_under_way() -> None:
    time, started = FakeTime(), asyncio.Event()

    async def slow_tick() -> None:
        started.set()
        await asyncio.Event().wait()  # never ends by itself

    async def scenario() -> tuple[bool, bool]:
        loop = PeriodicLoop("slow", slow_tick, 1.0, sleep=time.sleep)
        loop.start()
        advancing = asyncio.ensure_future(time.advance(1))  # returns once the loop ends
        await started.wait()
        await loop.stop()
        await advancing
        return loop.running, time.sleeping == 0

    assert asyncio.run(scenario()) == (False, True)


def test_the_caller_of_stop_task_still_sees_its_own_cancellation() -> None:
    async def scenario() -> None:
        stubborn = asyncio.ensure_future(asyncio.sleep(3600))
        stopper = asyncio.ensure_future(stop_task(stubborn))
        await asyncio.sleep(0)
        stopper.cancel()
        with pytest.raises(asyncio.CancelledError):
            await stopper
        assert stubborn.cancelled()

    asyncio.run(scenario())


def test_stop_task_logs_what_a_task_had_failed_with(caplog: pytest.LogCaptureFixture) -> None:
    async def fail() -> None:
        raise ValueError("broken")

    async def scenario() -> None:
        task = asyncio.ensure_future(fail())
        await asyncio.sleep(0)
        await stop_task(task)

    asyncio.run(scenario())
    [record] = caplog.records
    assert record.levelno == logging.ERROR and "broken" in str(record.exc_info)
