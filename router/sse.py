"""Server-sent events as the OpenAI API frames them."""

from __future__ import annotations

DONE_FRAME = "data: [DONE]\n\n"
SSE_HEADERS = {
    "Cache-Control": "no-cache",
    # Stops nginx-style proxies in front of the gateway from buffering the stream.
    "X-Accel-Buffering": "no",
}
