"""The relay step: a streamed answer's SSE frames from the engine to the client.

:func:`stream_response` turns an engine stream whose first frame has arrived into the
HTTP response; :func:`relay` is the generator behind it. However a stream ends (its
``[DONE]``, an error, the client leaving, the deadline), its closing out runs once and
to the end: the engine stream closed (which aborts the generation), the request record
finished, the key's slot and tokens released.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable

from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from llm_fleet.deployments.engine import Reply
from llm_fleet.router.accounting import RequestRecord, uninterrupted
from llm_fleet.router.api_errors import APIError, InternalServerError
from llm_fleet.router.errors import error_frame
from llm_fleet.router.guards import Deadline
from llm_fleet.router.sse import DONE_FRAME, SSE_HEADERS, UsageTap

logger = logging.getLogger(__name__)

# Finishes a request's record once: metrics, the access line, its key's hold released.
Finish = Callable[[RequestRecord], Awaitable[None]]


class RelayResponse(StreamingResponse):
    """A stream that is settled however its sending ends.

    Starlette may stop sending before the relay's first step (the client left between
    the first frame and the response start) or while the relay waits at a ``yield``;
    either way the relay's own ``finally`` would not run, leaving the engine generating
    and the request in flight for its key and the metrics. ``settle`` closes both.
    """

    def __init__(self, frames: AsyncIterator[str], settle: Callable[[], Awaitable[None]]):
        super().__init__(frames, media_type="text/event-stream", headers=SSE_HEADERS)
        self._settle = settle

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._settle()


async def relay(
    first: str,
    stream: AsyncIterator[str | Reply],
    record: RequestRecord,
    tap: UsageTap,
    finish: Finish,
    deadline: Deadline,
) -> AsyncGenerator[str, None]:
    """Relay frames as they come; an error after the first frame becomes an SSE error
    frame (the deadline's too: ``request_timeout``), and the usage chunk the router asked
    for is dropped unless the client asked too. A client that leaves cancels this
    generator or makes its next send fail (that frame counts as sent after the
    disconnect). The relay stops at ``[DONE]``: a client closing on it (as SDKs do) is a
    200. Its closing out runs to the end, cancellation or not (``uninterrupted``)."""

    async def frames() -> AsyncGenerator[str, None]:
        yield first
        while True:
            try:
                item = await deadline.within(anext(stream))
            except StopAsyncIteration:
                return
            if isinstance(item, str):
                yield item

    async def close_out() -> None:
        try:
            await stream.aclose()  # type: ignore[attr-defined]
        finally:
            await finish(record)

    try:
        async with contextlib.aclosing(frames()) as items:
            async for frame in items:
                relayed = tap.chunk(frame, record)
                if relayed is not None:
                    yield relayed
                    if relayed.endswith(DONE_FRAME):
                        break
    except APIError as err:
        record.failed(err)
        yield error_frame(err, record.request_id)
        yield DONE_FRAME
    except GeneratorExit:
        record.disconnected, record.status, record.tokens_after_disconnect = True, 499, 1
        raise
    except asyncio.CancelledError:
        record.disconnected, record.status = True, 499
        raise
    except Exception:
        logger.exception("stream %s failed", record.request_id)
        record.status = 500
        yield error_frame(InternalServerError("stream failed"), record.request_id)
        yield DONE_FRAME
    finally:
        await uninterrupted(close_out())


def stream_response(
    first: str,
    stream: AsyncIterator[str | Reply],
    record: RequestRecord,
    tap: UsageTap,
    finish: Finish,
    deadline: Deadline,
) -> RelayResponse:
    """The response that relays ``stream`` (its first frame already read); it finishes
    ``record`` itself when it ends, also if it never starts sending."""
    frames = relay(first, stream, record, tap, finish, deadline)

    async def never_started() -> None:
        if record.finished_at is None:
            record.disconnected, record.status = True, 499
            try:
                await stream.aclose()  # type: ignore[attr-defined]
            finally:
                await finish(record)

    async def settle() -> None:
        try:
            await frames.aclose()  # a relay suspended mid-stream finishes the record itself
        finally:
            await uninterrupted(never_started())

    return RelayResponse(frames, settle)
