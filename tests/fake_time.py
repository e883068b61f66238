"""A clock and a sleep that move only when a test says so.

``time = FakeTime()``: ``time`` is the clock to inject (``time()`` or ``time.now``),
``time.sleep`` the sleep. ``await time.advance(seconds)`` moves the clock forward,
stopping at each moment a sleep ends, and lets every loop whose sleep ended run until
it sleeps again or ends; only then does it return. A loop of period 10 s advanced by
70 s ticks exactly 7 times, however busy the machine is.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

# Real seconds a woken loop may take to sleep again or end: a hang fails, not blocks.
SETTLE_TIMEOUT_S = 10.0
# Event loop turns given to tasks just created before the clock moves.
_YIELDS = 5


@dataclass
class _Sleeper:
    until: float
    task: asyncio.Task[object]
    wake: asyncio.Future[None]


class FakeTime:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now
        self.slept: list[float] = []  # every sleep asked for, in order
        self._sleepers: list[_Sleeper] = []
        self._went_to_sleep: tuple[asyncio.AbstractEventLoop, asyncio.Event] | None = None

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        task = asyncio.current_task()
        assert task is not None
        wake = asyncio.get_running_loop().create_future()
        sleeper = _Sleeper(self.now + seconds, task, wake)
        self.slept.append(seconds)
        self._sleepers.append(sleeper)
        self._event().set()
        try:
            await wake
        finally:
            if sleeper in self._sleepers:  # cancelled while asleep
                self._sleepers.remove(sleeper)

    @property
    def sleeping(self) -> int:
        """How many tasks are asleep now."""
        return len(self._sleepers)

    async def advance(self, seconds: float) -> None:
        """Move the clock ``seconds`` forward, running what wakes on the way."""
        # Tasks just created (a loop started by a task itself just started) reach their
        # first sleep before the clock moves, so they sleep from now.
        for _ in range(_YIELDS):
            await asyncio.sleep(0)
        target = self.now + seconds
        while due := [s for s in self._sleepers if s.until <= target]:
            self.now = max(self.now, min(s.until for s in due))
            woken = [s for s in self._sleepers if s.until <= self.now]
            for sleeper in woken:
                self._sleepers.remove(sleeper)
                sleeper.wake.set_result(None)
            await self._settle([s.task for s in woken])
        self.now = target

    async def _settle(self, tasks: list[asyncio.Task[object]]) -> None:
        """Return once each task is asleep again or done."""
        async with asyncio.timeout(SETTLE_TIMEOUT_S):
            while pending := [t for t in tasks if not t.done() and not self._asleep(t)]:
                event = self._event()
                event.clear()
                waiter = asyncio.ensure_future(event.wait())
                try:
                    await asyncio.wait({waiter, *pending}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    waiter.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await waiter

    def _asleep(self, task: asyncio.Task[object]) -> bool:
        return any(s.task is task for s in self._sleepers)

    def _event(self) -> asyncio.Event:
        # One per event loop: a test may asyncio.run several scenarios with one FakeTime.
        loop = asyncio.get_running_loop()
        if self._went_to_sleep is None or self._went_to_sleep[0] is not loop:
            self._went_to_sleep = (loop, asyncio.Event())
        return self._went_to_sleep[1]
