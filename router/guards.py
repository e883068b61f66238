"""What a request waits under: its client still being there, and its deadline."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable
from typing import TypeVar

from fastapi import Request

from llm_fleet.router.api_errors import APIError, RequestTimeoutError

T = TypeVar("T")


class ClientDisconnected(Exception):
    """The client went away before the first item arrived."""


async def _wait_for_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(
    request: Request, work: Awaitable[T], watch: Awaitable[None] | None = None
) -> T:
    """``work``'s result, or ClientDisconnected (``work`` cancelled) if the client leaves
    first, or ``watch``'s error (``work`` cancelled) if it raises first.

    Used for a stream's first item (a non-streamed answer is one item, so the watch
    covers its whole generation), watching that the model stays up, and for a request
    queued for a loading model.
    """
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_wait_for_disconnect(request))
    watching = None if watch is None else asyncio.ensure_future(watch)
    guards = {gone} if watching is None else {gone, watching}
    try:
        done, _ = await asyncio.wait({task, *guards}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for guard in guards:
            guard.cancel()
    if task in done:
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
        await task
    if watching is not None and watching in done:
        watching.result()  # the watch's error
    raise ClientDisconnected


class Deadline:
    """``router.request_timeout_s`` for one request, counted from its arrival; a drain
    (``router/drain.py``) may :meth:`cut` it shorter."""

    def __init__(self, timeout_s: float | None) -> None:
        self.at = None if timeout_s is None else asyncio.get_running_loop().time() + timeout_s
        self._error: APIError = RequestTimeoutError(timeout_s or 0)
        self._waiting: asyncio.Timeout | None = None

    def cut(self, at: float, error: APIError) -> None:
        """End at loop time ``at`` (if sooner) with ``error``, also a wait under way."""
        if self.at is not None and self.at <= at:
            return
        self.at, self._error = at, error
        if self._waiting is not None:
            self._waiting.reschedule(at)

    async def within(self, work: Awaitable[T]) -> T:
        """``work``'s result, or the deadline's error (RequestTimeoutError, or the
        drain's) once it passes; ``work`` is then cancelled (an engine call's
        generation aborted)."""
        try:
            async with asyncio.timeout_at(self.at) as waiting:
                self._waiting = waiting
                return await work
        except TimeoutError:
            raise self._error from None
        finally:
            self._waiting = None
