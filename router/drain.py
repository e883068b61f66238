"""Draining before a shutdown: new requests refused, requests in flight given until an end.

A router replica follows a drain folder (``router.drain_dir``, or ``LLM_FLEET_DRAIN_DIR``;
``llm-fleet serve`` makes one and passes it on). Once the file ``draining`` appears in
it, holding the drain's end as Unix time (the launcher writes it on SIGTERM or Ctrl-C; on
Kubernetes a ``preStop`` hook can: ``echo $(( $(date +%s) + 30 )) > $DIR/draining``):

- new requests get 503 ``shutting_down`` with ``Retry-After``, and ``/health/ready`` 503,
  so load balancers stop sending;
- requests in flight go on until the end; one still running then ends as a timed-out one
  does, with 503 ``shutting_down`` (or that error frame ending its stream), its
  generation aborted;
- while requests are in flight, the replica keeps the file ``busy-<pid>`` in the
  folder; the launcher stops Serve once no such file is left, or at the end.

The folder is read every ``period_s`` (0.2 s) by a :class:`PeriodicLoop`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import weakref
from pathlib import Path

from llm_fleet.deployments.background import Clock, PeriodicLoop, Sleep
from llm_fleet.router.api_errors import ShuttingDownError
from llm_fleet.router.guards import Deadline

logger = logging.getLogger(__name__)

DRAIN_FILE = "draining"
PERIOD_S = 0.2


def read_drain_end(folder: Path) -> float | None:
    """The drain's end (Unix time) if ``folder`` says to drain, else None. A file
    whose content is not a number drains at once."""
    try:
        text = (folder / DRAIN_FILE).read_text()
    except FileNotFoundError:
        return None
    try:
        return float(text.strip())
    except ValueError:
        return 0.0


class Drain:
    """This replica's side of a drain (see the module docstring); ``folder`` None: never.

    The pipeline calls :meth:`refuse_if_draining` and :meth:`track` for each new request,
    and :meth:`started` / :meth:`finished` around it.
    """

    def __init__(
        self,
        folder: str | Path | None,
        *,
        wall_clock: Clock = time.time,
        sleep: Sleep = asyncio.sleep,
        period_s: float = PERIOD_S,
    ) -> None:
        self.folder = None if folder is None else Path(folder)
        self._wall_clock = wall_clock
        self.ends_at: float | None = None  # Unix time, once draining
        self.in_flight = 0
        self._deadlines: weakref.WeakSet[Deadline] = weakref.WeakSet()
        self._busy = None if self.folder is None else self.folder / f"busy-{os.getpid()}"
        self._loop = PeriodicLoop("drain watch", self.tick, period_s, sleep=sleep, logger=logger)

    @property
    def draining(self) -> bool:
        return self.ends_at is not None

    async def start(self) -> None:
        if self.folder is not None:
            self._loop.start()

    async def stop(self) -> None:
        await self._loop.stop()

    def refuse_if_draining(self) -> None:
        if self.ends_at is not None:
            left = self.ends_at - self._now()
            raise ShuttingDownError(retry_after_s=max(1, int(left) + 1))

    def track(self, deadline: Deadline) -> None:
        """``deadline`` ends at the drain's end too, if that comes first."""
        self._deadlines.add(deadline)
        if self.ends_at is not None:
            self._cut(deadline)

    def started(self) -> None:
        self.in_flight += 1

    def finished(self) -> None:
        self.in_flight -= 1

    async def tick(self) -> None:
        """Read the folder; on a drain's start, cut every deadline; keep the busy file."""
        assert self.folder is not None
        if self.ends_at is None:
            end = await asyncio.to_thread(read_drain_end, self.folder)
            if end is None:
                return
            self.ends_at = end
            logger.warning(
                "draining: new requests refused; %d in flight, given %.1f s",
                self.in_flight,
                max(0.0, end - self._now()),
            )
            for deadline in list(self._deadlines):
                self._cut(deadline)
        await asyncio.to_thread(self._mark_busy, self.in_flight > 0)

    def _mark_busy(self, busy: bool) -> None:
        assert self._busy is not None
        if busy:
            self._busy.touch()
        else:
            self._busy.unlink(missing_ok=True)

    def _now(self) -> float:
        return self._wall_clock()

    def _cut(self, deadline: Deadline) -> None:
        assert self.ends_at is not None
        left = self.ends_at - self._now()
        deadline.cut(asyncio.get_running_loop().time() + max(0.0, left), ShuttingDownError())
