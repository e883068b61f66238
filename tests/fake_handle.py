"""A Ray Serve deployment handle over a real ``ModelDeployment`` replica, in-process.

The router's unit tests reach the model as production does:
``HandleModelClient`` → ``handle.generate.remote(EngineRequest)`` →
``ModelDeployment.generate`` → the engine (``tests/fake_engine.py``). Only Ray's
transport is replaced, and it keeps what the router depends on:

- the replica runs each call in a task of its own, which goes on whether or not anyone
  reads, and ``cancel()`` cancels that task (which aborts the generation);
- the request and every item cross pickled, as they do between Ray processes;
- it fails as Serve fails: a refusal (``BackPressureError``) from ``remote()`` itself or
  before the first item, a dead replica mid-stream (any exception, after ``die_after``
  items), and a ``cancel()`` that raises again the error a failed call ended with;
- a call can wait in the handle's queue (``queued_s``) before the replica sees it, and
  the end of a stream can arrive a while after its last item (``end_lag_s``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import pickle
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

from ray.serve.exceptions import BackPressureError

from llm_fleet.deployments.config import CpuBindingConfig, ModelConfig
from llm_fleet.deployments.engine import EngineRequest, Reply
from llm_fleet.deployments.model_deployment import ModelDeployment
from tests.fake_engine import FakeEngine

T = TypeVar("T")

# What Serve raises when a model's queue is full; the router answers 503, Retry-After: 1.
BACK_PRESSURE = BackPressureError(num_queued_requests=64, max_queued_requests=64, retry_after_s=1)


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` to the end on a loop of its own (in a thread: the caller may be
    inside a running loop)."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


class _InProcessReplica(ModelDeployment):
    """``ModelDeployment`` as it is, but for its finalizer: Serve awaits the async
    ``__del__`` when it stops a replica; in-process nobody would (the garbage collector
    would only warn of a coroutine never awaited), and the fake engine holds nothing."""

    def __del__(self) -> None:  # type: ignore[override]
        return None


def start_replica(model: ModelConfig, engine: FakeEngine, weights: Path) -> ModelDeployment:
    """A started ``ModelDeployment`` for ``model`` whose engine is ``engine``.

    As Serve does, the object is made, then its async ``__init__`` awaited. ``weights``
    is a local model folder (the fake engine reads no weights).
    """
    local = model.model_copy(update={"source": str(weights)})
    replica = _InProcessReplica.__new__(_InProcessReplica)
    run_sync(
        replica.__init__(  # type: ignore[misc]
            local,
            engine_factory=lambda _model, _path: engine,
            cpu_binding=CpuBindingConfig(mode="off"),
        )
    )
    return replica


def _crossed(value: T) -> T:
    """``value`` as the other side of a Ray call receives it."""
    copy: T = pickle.loads(pickle.dumps(value))
    return copy


class ReplicaResponse:
    """What ``remote()`` returns for a streaming handle: an async iterator with ``cancel``."""

    def __init__(self, handle: ReplicaHandle, request: EngineRequest) -> None:
        self._handle = handle
        self._items: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self.cancelled = False
        self.left_queue = False  # cancelled while it waited for the replica
        self.failed_with: BaseException | None = None
        self._task = asyncio.get_running_loop().create_task(self._run(_crossed(request)))

    async def _run(self, request: EngineRequest) -> None:
        handle = self._handle
        try:
            await self._wait_in_queue()
            if handle.refuse is not None:
                raise handle.refuse
            sent = 0
            async with contextlib.aclosing(handle.replica.generate(request)) as items:
                async for item in items:
                    if handle.death is not None and sent == handle.die_after:
                        raise handle.death
                    self._items.put_nowait(("item", _crossed(item)))
                    sent += 1
            await asyncio.sleep(handle.end_lag_s)
            self._items.put_nowait(("end", None))
        except Exception as exc:  # noqa: BLE001 - what the call ended with goes to its reader
            self.failed_with = exc
            self._items.put_nowait(("error", exc))

    async def _wait_in_queue(self) -> None:
        try:
            await asyncio.sleep(self._handle.queued_s)
        except asyncio.CancelledError:
            self.left_queue = True
            raise

    def __aiter__(self) -> ReplicaResponse:
        return self

    async def __anext__(self) -> str | Reply:
        kind, value = await self._items.get()
        if kind == "end":
            raise StopAsyncIteration
        if kind == "error":
            raise value
        item: str | Reply = value
        return item

    def cancel(self) -> None:
        self.cancelled = True
        self._task.cancel()
        if self.failed_with is not None:
            raise self.failed_with  # as Serve's cancel() re-raises a failed call's error


class ReplicaHandle:
    """``handle.options(...).generate.remote(request)`` over one ``ModelDeployment``.

    ``refuse``: raised for every call, from ``remote()`` itself when ``refuse_at_call``,
    else as the stream's first item. ``death``: raised in place of item ``die_after``
    (counting from 0), the replica's generation closed. ``options`` records what it is
    given in ``options_seen``.
    """

    def __init__(
        self,
        replica: ModelDeployment,
        *,
        refuse: Exception | None = None,
        refuse_at_call: bool = False,
        death: Exception | None = None,
        die_after: int = 1,
        queued_s: float = 0.0,
        end_lag_s: float = 0.0,
    ) -> None:
        self.replica = replica
        self.refuse, self.refuse_at_call = refuse, refuse_at_call
        self.death, self.die_after = death, die_after
        self.queued_s, self.end_lag_s = queued_s, end_lag_s
        self.options_seen: list[dict[str, Any]] = []
        self.responses: list[ReplicaResponse] = []

    def options(self, **options: Any) -> ReplicaHandle:
        self.options_seen.append(options)
        return self

    @property
    def generate(self) -> ReplicaHandle:
        return self

    def remote(self, request: EngineRequest) -> ReplicaResponse:
        if self.refuse is not None and self.refuse_at_call:
            raise self.refuse
        response = ReplicaResponse(self, request)
        self.responses.append(response)
        return response
