"""Stream items between model replica and router: ready frames travel joined, none wait."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import pytest

from llm_fleet.deployments.engine import Reply
from llm_fleet.deployments.frame_coalescing import coalesce_frames, split_frames
from llm_fleet.router.accounting import RequestRecord
from llm_fleet.router.sse import DONE_FRAME, UsageTap
from tests.fake_engine import FakeEngine


def frame(n: int) -> str:
    return f'data: {{"n": {n}}}\n\n'


async def paced(gaps: list[float], tail: list[str]) -> AsyncIterator[str]:
    """One frame after each gap, then ``tail`` all at once (vLLM's last frames)."""
    for n, gap in enumerate(gaps):
        await asyncio.sleep(gap)
        yield frame(n)
    for text in tail:
        yield text


async def collect(items: AsyncIterator[str | Reply]) -> list[str | Reply]:
    return [item async for item in items]


def test_split_frames_gives_back_each_frame() -> None:
    joined = frame(0) + frame(1) + DONE_FRAME
    assert list(split_frames(joined)) == [frame(0), frame(1), DONE_FRAME]
    assert list(split_frames(frame(7))) == [frame(7)]


def test_frames_that_come_together_travel_as_one_item() -> None:
    items = asyncio.run(collect(coalesce_frames(paced([0, 0.05], [frame(9), DONE_FRAME]))))
    # The first frame at once; the second came alone; the tail came all together.
    assert items == [frame(0), frame(1) + frame(9) + DONE_FRAME]


def test_a_slow_consumer_gets_everything_produced_meanwhile() -> None:
    async def scenario() -> list[str | Reply]:
        out = []
        async for item in coalesce_frames(paced([0.0] + [0.01] * 5, [])):
            out.append(item)
            await asyncio.sleep(0.08)  # the hop to the router is slower than the engine
        return out

    items = asyncio.run(scenario())
    assert "".join(str(i) for i in items) == "".join(frame(n) for n in range(6))
    assert len(items) < 6


def test_the_first_frame_is_not_held_back() -> None:
    async def scenario() -> float:
        loop = asyncio.get_running_loop()
        started = loop.time()
        stream = coalesce_frames(paced([0.0, 5.0], []))
        await anext(stream)
        waited = loop.time() - started
        await stream.aclose()
        return waited

    assert asyncio.run(scenario()) < 1.0


def test_replies_and_errors_pass_through() -> None:
    async def with_reply() -> AsyncIterator[str | Reply]:
        yield Reply(status=400, body={"error": {"message": "no"}})

    assert asyncio.run(collect(coalesce_frames(with_reply()))) == [
        Reply(status=400, body={"error": {"message": "no"}})
    ]

    async def failing() -> AsyncIterator[str]:
        yield frame(0)
        raise RuntimeError("engine died")

    async def scenario() -> list[str | Reply]:
        return await collect(coalesce_frames(failing()))

    with pytest.raises(RuntimeError, match="engine died"):
        asyncio.run(scenario())


def test_closing_the_stream_aborts_the_generation() -> None:
    """A client that leaves closes the coalescer: the engine must stop generating."""

    async def scenario() -> int:
        engine = FakeEngine("m", token_delay_s=0.01)
        await engine.start()
        body = {
            "model": "m",
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 500,
            "ignore_eos": True,
            "stream": True,
        }
        stream = coalesce_frames(engine.generate("chat", body, "req-1"))
        await anext(stream)
        await asyncio.sleep(0.05)
        await stream.aclose()
        await asyncio.sleep(0.05)
        return await engine.num_unfinished_requests()

    assert asyncio.run(scenario()) == 0


def test_the_router_reads_usage_from_joined_frames_and_drops_its_own_usage_chunk() -> None:
    usage = {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}
    content = [
        'data: {"choices": [{"delta": {"content": "a"}}]}\n\n',
        'data: {"choices": [{"delta": {"content": "b"}}]}\n\n',
    ]
    usage_frame = f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n"
    record = RequestRecord(request_id="r", endpoint="chat")
    relayed = UsageTap(drop_usage_chunk=True).chunk("".join(content) + usage_frame, record)
    assert relayed == "".join(content)
    assert (record.prompt_tokens, record.completion_tokens, record.frames) == (5, 2, 2)
    record = RequestRecord(request_id="r", endpoint="chat")
    assert UsageTap(drop_usage_chunk=True).chunk(usage_frame, record) is None
    assert UsageTap(drop_usage_chunk=False).chunk(usage_frame + DONE_FRAME, record) == (
        usage_frame + DONE_FRAME
    )
