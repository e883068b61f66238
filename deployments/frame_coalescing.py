"""Fewer, larger stream items between a model replica and the router.

Each item a Serve streaming call yields is one Ray message (and one hop more through the
Serve proxy). A stream whose frames come faster than they can be sent (a long answer
under load, or the three frames vLLM sends at once at the end: the last delta, the usage
chunk and ``[DONE]``) wastes a message per frame. :func:`coalesce_frames` sends the first
item at once and then, each time the consumer asks for the next one, every SSE frame
already produced, joined into one string. There is no timer: nothing waits for more
frames, so no latency is added.

A joined item is still whole SSE frames (``"data: ...\\n\\n"`` each); the router reads
them with :func:`split_frames`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Iterator

from llm_fleet.deployments.engine import Reply

_END = object()
FRAME_END = "\n\n"


def split_frames(item: str) -> Iterator[str]:
    """The SSE frames of one stream item (one or more ``"data: ...\\n\\n"``)."""
    start = 0
    while start < len(item):
        end = item.find(FRAME_END, start)
        end = len(item) if end < 0 else end + len(FRAME_END)
        yield item[start:end]
        start = end


async def coalesce_frames(
    items: AsyncIterator[str | Reply],
) -> AsyncGenerator[str | Reply, None]:
    """``items``, with the string frames that are ready when asked for joined into one.

    A task reads ``items`` into a queue as fast as they come; closing this generator
    cancels that task, which closes ``items`` (so a cancelled request still aborts its
    generation).
    """
    queue: asyncio.Queue[object] = asyncio.Queue()

    async def pump() -> None:
        try:
            async for item in items:
                queue.put_nowait(item)
        except Exception as exc:  # noqa: BLE001  # handed to the consumer, raised there
            queue.put_nowait(exc)
        finally:
            queue.put_nowait(_END)

    reader = asyncio.create_task(pump())
    try:
        pending: object = await queue.get()
        while pending is not _END:
            if isinstance(pending, Exception):
                raise pending
            if not isinstance(pending, str):
                yield pending  # type: ignore[misc]  # a Reply: sent on its own
                pending = await queue.get()
                continue
            frames = [pending]
            pending = None
            while not queue.empty():
                ready = queue.get_nowait()
                if not isinstance(ready, str):
                    pending = ready
                    break
                frames.append(ready)
            yield "".join(frames)
            if pending is None:
                pending = await queue.get()
    finally:
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader
        await items.aclose()  # type: ignore[attr-defined]
