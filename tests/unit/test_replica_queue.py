"""A model replica's own bound (``ReplicaQueue`` in ``deployments/model_deployment.py``):
``max_ongoing_requests`` in the engine, ``max_queued_requests`` waiting in order, and an
OpenAI-shaped 503 at once past that; a waiter that leaves gives its place back.

This is what a direct door's client sees when the model is full, in place of Serve's
plain-text 503 (``tests/serve/test_reliability.py`` runs it on the real stack)."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from llm_fleet.deployments.config import ModelConfig
from llm_fleet.deployments.engine import EngineRequest, Reply
from llm_fleet.deployments.model_deployment import ModelDeployment, ReplicaQueue
from tests.fake_engine import FakeEngine
from tests.fake_handle import run_sync, start_replica
from tests.fakes import fake_weights


def _replica(max_ongoing: int, max_queued: int) -> tuple[ModelDeployment, FakeEngine]:
    model = ModelConfig.model_validate(
        {
            "id": "m",
            "source": "embedded://smollm2-135m-instruct",
            "max_ongoing_requests": max_ongoing,
            "max_queued_requests": max_queued,
        }
    )
    engine = FakeEngine("m", token_delay_s=0.05)
    return start_replica(model, engine, fake_weights()), engine


def _request(i: int, tokens: int = 6, *, stream: bool = False) -> EngineRequest:
    body: dict[str, Any] = {
        "model": "m",
        "messages": [{"role": "user", "content": "a b c"}],
        "max_tokens": tokens,
        "ignore_eos": True,
        "stream": stream,
    }
    return EngineRequest("chat", body, f"req-{i}")


async def _whole(replica: ModelDeployment, request: EngineRequest) -> Reply:
    items = [item async for item in replica.generate(request)]
    assert len(items) == 1 and isinstance(items[0], Reply), items
    return items[0]


def test_past_its_queue_a_request_is_refused_at_once_with_an_openai_503() -> None:
    replica, _ = _replica(max_ongoing=1, max_queued=2)

    async def burst() -> list[tuple[Reply, float]]:
        loop = asyncio.get_running_loop()
        started = loop.time()

        async def one(i: int) -> tuple[Reply, float]:
            reply = await _whole(replica, _request(i))
            return reply, loop.time() - started

        return await asyncio.gather(*(one(i) for i in range(6)))

    answers = run_sync(burst())
    served = [took for reply, took in answers if reply.status == 200]
    refused = [(reply, took) for reply, took in answers if reply.status != 200]
    # One runs, two wait their turn (one after another: 6 tokens of 50 ms each), three refused.
    assert len(served) == 3, answers
    assert sorted(served)[-1] > 2 * 6 * 0.05, served
    assert len(refused) == 3, answers
    for reply, took in refused:
        assert reply.status == 503
        assert reply.error is not None
        assert (reply.error.type, reply.error.code) == ("service_unavailable", None)
        assert "at capacity" in reply.error.message
        assert took < 0.2, "a refusal waits for nothing"


def test_a_waiter_that_leaves_gives_its_place_back() -> None:
    replica, engine = _replica(max_ongoing=1, max_queued=1)

    async def scene() -> tuple[int, int]:
        running = asyncio.create_task(_whole(replica, _request(0, tokens=10)))
        await asyncio.sleep(0.05)
        waiter = asyncio.create_task(_whole(replica, _request(1)))
        await asyncio.sleep(0.05)
        waiter.cancel()  # its client left while it waited
        with contextlib.suppress(asyncio.CancelledError):
            await waiter
        # Its place is free again: this one waits and is served, not refused.
        late = await _whole(replica, _request(2))
        first = await running
        return first.status, late.status

    assert run_sync(scene()) == (200, 200)
    assert run_sync(engine.num_unfinished_requests()) == 0


def test_slots_come_back_however_a_stream_ends() -> None:
    """A stream closed early (a client leaving mid-stream) frees its slot."""
    replica, _ = _replica(max_ongoing=1, max_queued=1)

    async def scene() -> list[int]:
        statuses = []
        for i in range(3):
            stream = replica.generate(_request(i, tokens=50, stream=True))
            await anext(stream)  # the first frame, then the client leaves
            await stream.aclose()  # type: ignore[attr-defined]
        for i in range(3, 5):
            statuses.append((await _whole(replica, _request(i, tokens=2))).status)
        return statuses

    assert run_sync(scene()) == [200, 200]


def test_the_queue_alone_is_fifo_and_bounded() -> None:
    async def scene() -> tuple[list[int], bool]:
        queue = ReplicaQueue(slots=1, waiting=2)
        order: list[int] = []
        assert await queue.enter()

        async def wait(i: int) -> None:
            assert await queue.enter()
            order.append(i)
            queue.leave()

        waiters = [asyncio.create_task(wait(i)) for i in range(2)]
        await asyncio.sleep(0)
        refused = not await queue.enter()  # two wait: a third is refused
        queue.leave()
        await asyncio.gather(*waiters)
        return order, refused

    assert run_sync(scene()) == ([0, 1], True)
