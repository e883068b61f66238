"""One owner for the background loops of a replica: start, tick, stop.

A :class:`PeriodicLoop` runs ``tick`` every ``period_s`` seconds in a task of the running
event loop, from :meth:`~PeriodicLoop.start` until :meth:`~PeriodicLoop.stop` (or until
its ``while_`` condition turns false: a loop that only has work while something is in
flight ends by itself, and is started again with the next piece of work). An exception
in one tick is logged with its traceback and the loop goes on at the next period: one
bad tick never silently ends a watch that a replica relies on.

Time is injected: ``sleep`` (``asyncio.sleep`` by default) is what the loop waits with,
so a test drives the loop with a fake one instead of waiting on real periods. The same
module names the clock type the classes using it take (``time.monotonic`` by default).

It lives on the model side because both sides use it (the router may import
``deployments/``, never the reverse).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

log = logging.getLogger(__name__)

Clock = Callable[[], float]
"""Seconds on a monotonic scale (``time.monotonic``)."""
Sleep = Callable[[float], Awaitable[None]]
"""Waits that many seconds (``asyncio.sleep``)."""


async def stop_task(task: asyncio.Future[Any]) -> None:
    """Cancel ``task`` and wait until it has ended; an error it had ended with is logged.

    The caller's own cancellation still reaches the caller (unlike suppressing
    CancelledError around ``await task``, which would swallow it).
    """
    task.cancel()
    outcomes: list[object] = await asyncio.gather(task, return_exceptions=True)
    outcome = outcomes[0]
    if isinstance(outcome, Exception):
        log.error("a background task had failed before it was stopped", exc_info=outcome)


class PeriodicLoop:
    """Calls ``tick`` every ``period_s`` seconds between :meth:`start` and :meth:`stop`.

    ``name`` says what the loop does, in its log lines ("keys file watch failed;
    retrying"). ``while_``, when given, is checked before each wait and after it: once
    false, the loop ends (:attr:`running` is then False and :meth:`start` starts it
    again). ``logger`` is where a failed tick is reported (the owner's own logger).
    """

    def __init__(
        self,
        name: str,
        tick: Callable[[], Awaitable[object]],
        period_s: float,
        *,
        while_: Callable[[], bool] | None = None,
        sleep: Sleep = asyncio.sleep,
        logger: logging.Logger | None = None,
    ) -> None:
        self.name = name
        self.period_s = period_s
        self._tick = tick
        self._while = while_
        self._sleep = sleep
        self._logger = logger or log
        self._task: asyncio.Task[None] | None = None

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        """Start the loop on the running event loop; no-op while it runs."""
        if not self.running:
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name=f"llm_fleet {self.name}"
            )

    async def stop(self) -> None:
        """Cancel the loop and wait for it to end (a tick under way is cancelled)."""
        task, self._task = self._task, None
        if task is not None:
            await stop_task(task)

    def _more(self) -> bool:
        return self._while is None or self._while()

    async def _run(self) -> None:
        while self._more():
            await self._sleep(self.period_s)
            if not self._more():
                return
            try:
                await self._tick()
            except Exception:
                self._logger.exception("%s failed; retrying", self.name)
