"""One record per inference request: its metrics, its log line and its Server-Timing.

The router fills a :class:`RequestRecord` as the request goes (model, status, token
counts, frame times) and finishes it exactly once, when the answer is sent, the
stream ends or the client leaves. Finishing feeds the metrics (``router/metrics.py``),
writes the access log line and, with tracing on, makes its span (``router/tracing.py``).

The access log line (logger ``llm_fleet.access``, one per request) carries the
request id, model, endpoint, status, token counts, latencies and ``key`` (the API
key's id from the keys file, never the key), never prompt or completion text, nor
headers. Inside Ray Serve it goes to the router replica's log
with Serve's own fields; with the app's ``logging_config: {encoding: JSON}`` each line
is one JSON object whose keys include these fields.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any

from llm_fleet.deployments.engine import Route
from llm_fleet.router.api_errors import APIError

# The access log keeps its own documented name (README, Logs); every other logger is
# named after its module.
access_logger = logging.getLogger("llm_fleet.access")
logger = logging.getLogger(__name__)
UNKNOWN_MODEL = "unknown"
# Closing work that outlived the request task that started it (see ``uninterrupted``).
_closing: set[asyncio.Future[None]] = set()


def _closed(task: asyncio.Future[None]) -> None:
    _closing.discard(task)
    if not task.cancelled() and (exc := task.exception()) is not None:
        logger.error("closing out a request failed", exc_info=exc)


async def uninterrupted(work: Awaitable[None]) -> None:
    """Run ``work`` (a request's closing out: its stream closed, its record finished, its
    key's slot and tokens released) to its end, even if the caller is cancelled meanwhile.

    A request can end by cancellation at any await: Ray Serve cancels a request's task
    when its HTTP client leaves, and Starlette's streaming response runs the relay in an
    anyio task group whose cancellation hits *every* later await in it, the relay's
    ``finally`` included. Closing work awaited there directly would be cut at its first
    await (an actor call releasing the key's slot), leaking the slot, the tokens and the
    in-flight gauge. Here it runs as its own task: the caller still sees its
    cancellation, and the work finishes regardless (an error in it is logged).
    """
    await asyncio.shield(in_background(work))


def in_background(work: Awaitable[None]) -> asyncio.Future[None]:
    """``work`` as a task that nothing cancels and nothing loses (an error is logged)."""
    task = asyncio.ensure_future(work)
    _closing.add(task)
    task.add_done_callback(_closed)
    return task


@dataclass
class RequestRecord:
    request_id: str
    endpoint: Route
    path: str | None = None  # the route's path when it is not the endpoint's own (/api/*)
    started: float = field(default_factory=time.perf_counter)
    model: str = UNKNOWN_MODEL  # a configured id only: metric labels stay bounded
    key: str | None = None  # the API key's id (never the key); None without auth
    stream: bool = False
    status: int = 200
    error_code: str | None = None
    error_type: str | None = None  # the OpenAI error body's type
    rejection: str | None = None
    dispatched_at: float | None = None
    replied_at: float | None = None
    first_frame_at: float | None = None
    last_frame_at: float | None = None
    frames: int = 0
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    engine_s: float | None = None
    disconnected: bool = False
    tokens_after_disconnect: int = 0
    finished_at: float | None = None

    def dispatched(self) -> None:
        self.dispatched_at = time.perf_counter()

    def frame(self) -> None:
        """A content frame reached the router (about one token with vLLM's streaming)."""
        now = time.perf_counter()
        if self.first_frame_at is None:
            self.first_frame_at = now
        self.last_frame_at = now
        self.frames += 1

    def failed(self, err: APIError) -> None:
        self.status = err.status_code
        self.error_code = err.code
        self.error_type = err.error_type
        if self.replied_at is None:
            # Refused before any answer came back (by the router, or Serve's back-pressure);
            # an engine's own 4xx is an answer, not a rejection.
            self.rejection = err.rejection

    def usage(self, usage: Any) -> None:
        if isinstance(usage, dict):
            prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
            self.prompt_tokens = prompt if isinstance(prompt, int) else self.prompt_tokens
            if isinstance(completion, int):
                self.completion_tokens = completion

    def finish(self) -> None:
        self.finished_at = time.perf_counter()
        if self.completion_tokens is None and self.frames:
            # A stream cut short has no usage chunk: count what was relayed.
            self.completion_tokens = self.frames

    @property
    def tokens_used(self) -> int:
        """Prompt + completion tokens known so far (what a key's tpm is charged)."""
        return (self.prompt_tokens or 0) + (self.completion_tokens or 0)

    @property
    def latency_s(self) -> float:
        return (self.finished_at or time.perf_counter()) - self.started

    @property
    def ttft_s(self) -> float | None:
        if not self.stream or self.first_frame_at is None:
            return None
        return self.first_frame_at - self.started

    @property
    def itl_s(self) -> float | None:
        """Mean gap between frames of a stream (None with fewer than two)."""
        if self.frames < 2 or self.first_frame_at is None or self.last_frame_at is None:
            return None
        return (self.last_frame_at - self.first_frame_at) / (self.frames - 1)

    def phases(self) -> list[tuple[str, float, float]]:
        """Where the time went up to the answer, as ``(name, start, end)`` on the
        ``perf_counter`` clock; Server-Timing and the request's trace span both tell it.

        ``routing``: the router's own work before sending (parsing, checks, waiting for
        a model to be ready). ``queue``: from sending to the answer, minus the engine's
        time: Ray Serve's queue for a free replica and the hops there and back (drawn
        before the engine). ``engine``: the replica's time (vLLM's own queue, prefill
        and decode). The last two only once the engine's time is known (a whole answer).
        """
        end = self.replied_at or time.perf_counter()
        sent = self.dispatched_at or end
        parts = [("routing", self.started, sent)]
        if self.engine_s is not None and self.dispatched_at is not None:
            engine_from = max(sent, end - self.engine_s)
            parts += [("queue", sent, engine_from), ("engine", engine_from, end)]
        return parts

    def server_timing(self) -> str:
        """``Server-Timing`` for a whole answer (:meth:`phases` and the ``total``), in
        milliseconds."""
        phases = self.phases()
        parts = [(name, end - start) for name, start, end in phases]
        parts.append(("total", phases[-1][2] - self.started))
        return ", ".join(f"{name};dur={seconds * 1000:.1f}" for name, seconds in parts)

    def log_fields(self) -> dict[str, Any]:
        def ms(seconds: float | None) -> float | None:
            return None if seconds is None else round(seconds * 1000, 1)

        return {
            "request_id": self.request_id,
            "model": self.model,
            "endpoint": self.endpoint,
            "stream": self.stream,
            "status": self.status,
            "error_code": self.error_code,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "latency_ms": ms(self.latency_s),
            "ttft_ms": ms(self.ttft_s),
            "client_disconnected": self.disconnected,
            "key": self.key,
        }


def log_request(record: RequestRecord) -> None:
    """The access line: a short message, the fields as ``extra`` (keys in JSON logs,
    ``key=value`` pairs after the message in Serve's TEXT logs)."""
    fields = record.log_fields()
    access_logger.info(
        "%s %s %s %sms",
        record.endpoint,
        record.model,
        record.status,
        fields["latency_ms"],
        extra=fields,
    )
