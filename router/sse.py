"""Server-sent events as the OpenAI API frames them, and the usage the router reads off them."""

from __future__ import annotations

import json
from typing import Any

from llm_fleet.deployments.frame_coalescing import FRAME_END, split_frames
from llm_fleet.router.accounting import RequestRecord

DONE_FRAME = "data: [DONE]\n\n"
SSE_HEADERS = {
    "Cache-Control": "no-cache",
    # Stops nginx-style proxies in front of the gateway from buffering the stream.
    "X-Accel-Buffering": "no",
}


def ask_for_usage(body: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """A streaming body that makes the engine send its usage chunk.

    Returns the body to send and whether the client did not ask for usage itself
    (the router then drops that chunk after reading the token counts).
    """
    if not body.get("stream"):
        return body, False
    options = body.get("stream_options") or {}
    if options.get("include_usage"):
        return body, False
    return {**body, "stream_options": {**options, "include_usage": True}}, True


class UsageTap:
    """Reads token counts off a stream and counts its content frames."""

    def __init__(self, drop_usage_chunk: bool):
        self._drop = drop_usage_chunk

    def chunk(self, item: str, record: RequestRecord) -> str | None:
        """The text to relay for one stream item, one frame or several joined
        (``streaming.coalesce_frames``); None: nothing left to relay."""
        if item.count(FRAME_END) <= 1:
            return self.frame(item, record)
        kept = [text for frame in split_frames(item) if (text := self.frame(frame, record))]
        return "".join(kept) or None

    def frame(self, frame: str, record: RequestRecord) -> str | None:
        """The frame to relay (None: drop it), after noting what it says.

        vLLM's serving layer hands its chunks over as SSE text, so the usage is read
        from the parsed chunk: its ``usage`` object and an empty ``choices`` list
        decide. The test for the quoted key only spares parsing the frames that cannot
        hold one (a JSON object with a ``usage`` key always contains ``"usage"``; the
        words of generated text arrive escaped, ``\\"usage\\"``).
        """
        if frame == DONE_FRAME:
            return frame
        if '"usage"' in frame:
            try:
                payload = json.loads(frame.removeprefix("data: "))
            except ValueError:
                payload = None
            if isinstance(payload, dict) and isinstance(payload.get("usage"), dict):
                record.usage(payload["usage"])
                if payload.get("choices") == []:
                    return None if self._drop else frame
        record.frame()
        return frame
