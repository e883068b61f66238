"""``UsageTap``: the usage a stream reports is read off its parsed chunks, never off
the words of generated text."""

from __future__ import annotations

import json
from typing import Any

from llm_fleet.router.accounting import RequestRecord
from llm_fleet.router.sse import DONE_FRAME, UsageTap


def sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def content(text: str) -> str:
    return sse({"object": "chat.completion.chunk", "choices": [{"delta": {"content": text}}]})


USAGE = {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
USAGE_CHUNK = sse({"object": "chat.completion.chunk", "choices": [], "usage": USAGE})


def tap(frames: list[str], *, drop: bool) -> tuple[list[str], RequestRecord]:
    record = RequestRecord(request_id="r", endpoint="chat")
    usage_tap = UsageTap(drop_usage_chunk=drop)
    relayed = [text for frame in frames if (text := usage_tap.chunk(frame, record)) is not None]
    return relayed, record


def test_generated_text_that_names_usage_is_content() -> None:
    words = [content('{"usage": {"prompt_tokens": 99}, "choices": []}'), content('"usage"')]
    relayed, record = tap([*words, DONE_FRAME], drop=True)
    assert relayed == [*words, DONE_FRAME]
    assert (record.frames, record.prompt_tokens, record.completion_tokens) == (2, None, None)


def test_the_usage_chunk_is_read_and_dropped_when_the_router_asked_for_it() -> None:
    relayed, record = tap([content("a"), USAGE_CHUNK, DONE_FRAME], drop=True)
    assert relayed == [content("a"), DONE_FRAME]
    assert (record.frames, record.prompt_tokens, record.completion_tokens) == (1, 7, 3)


def test_the_usage_chunk_is_relayed_when_the_client_asked_for_it() -> None:
    relayed, record = tap([content("a"), USAGE_CHUNK, DONE_FRAME], drop=False)
    assert relayed == [content("a"), USAGE_CHUNK, DONE_FRAME]
    assert (record.prompt_tokens, record.completion_tokens) == (7, 3)


def test_continuous_usage_on_content_chunks_is_read_and_the_chunks_relayed() -> None:
    running = sse(
        {"choices": [{"delta": {"content": "a"}}], "usage": {**USAGE, "completion_tokens": 1}}
    )
    relayed, record = tap([running, USAGE_CHUNK], drop=True)
    assert relayed == [running]
    assert (record.frames, record.completion_tokens) == (1, 3)


def test_joined_frames_are_read_one_by_one() -> None:
    joined = content("a") + content("b") + USAGE_CHUNK + DONE_FRAME
    relayed, record = tap([joined], drop=True)
    assert relayed == [content("a") + content("b") + DONE_FRAME]
    assert (record.frames, record.completion_tokens) == (2, 3)
