"""Stop generating for a router replica that died.

When a client disconnects, the router cancels its handle call and the engine aborts the
request. When the router replica itself dies (killed, out of memory, node lost), nobody
cancels: Ray Serve leaves the model replica's generator running to ``max_tokens``,
holding engine capacity for an answer nobody will read (seen here: a 1,500-token stream
ran on for a minute after its router was killed).

So the router names itself (its Serve replica actor's name) with each request, and each
model replica keeps one :class:`CallerWatch`: every ``period_s`` it asks, once per
distinct caller with requests in flight (a handful of router replicas, however many
requests), whether that caller is still alive, and cancels the requests of the ones
that are gone. Cancelling is what a disconnect does, so the engine aborts the same way.
A lookup that fails (the GCS briefly away) counts as alive: never cancel on doubt.
The watch runs only while some request is tracked (``deployments/background.py``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from llm_fleet.deployments.background import PeriodicLoop, Sleep

logger = logging.getLogger(__name__)
PERIOD_S = 5.0


def serve_replica_alive(name: str) -> bool:
    """Whether the Serve replica actor ``name`` still exists (its name is freed at death)."""
    import ray
    from ray.exceptions import RayError

    try:
        ray.get_actor(name, namespace="serve")
    except ValueError:
        return False
    except RayError:
        return True  # cannot tell: keep generating
    return True


class CallerWatch:
    """Cancels the tracked tasks of callers that died (see the module docstring)."""

    def __init__(
        self,
        is_alive: Callable[[str], bool] = serve_replica_alive,
        period_s: float = PERIOD_S,
        *,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self._is_alive = is_alive
        self._tasks: dict[str, set[asyncio.Task[object]]] = {}
        self._watch = PeriodicLoop(
            "the caller watch",
            self._cancel_orphans,
            period_s,
            while_=lambda: bool(self._tasks),
            sleep=sleep,
            logger=logger,
        )

    def track(self, caller: str) -> Callable[[], None]:
        """Watch the current task for ``caller``; returns the function that stops it."""
        task = asyncio.current_task()
        if task is None:
            return lambda: None
        tasks = self._tasks.setdefault(caller, set())
        tasks.add(task)
        self._watch.start()  # no-op while it runs

        def untrack() -> None:
            tasks.discard(task)
            if not tasks and self._tasks.get(caller) is tasks:
                del self._tasks[caller]

        return untrack

    async def _cancel_orphans(self) -> None:
        """One look: cancel the requests of each tracked caller that is gone."""
        for caller in list(self._tasks):
            if await asyncio.to_thread(self._is_alive, caller):
                continue
            orphans = self._tasks.pop(caller, set())
            logger.warning(
                "caller %s is gone: aborting its %d request(s) in flight", caller, len(orphans)
            )
            for task in orphans:
                task.cancel()

    async def stop(self) -> None:
        await self._watch.stop()
