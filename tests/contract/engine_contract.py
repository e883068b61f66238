"""The engine contract, written once, checked against any engine-like object.

Each check is ``async def check_x(engine, model_id, **kwargs) -> None`` and raises
``AssertionError`` when the engine breaks the contract of ``deployments/engine.py``.
``engine`` needs only ``generate(route, body, request_id)`` (an async generator of
SSE strings and ``Reply``) and ``async num_unfinished_requests()``: a ``FakeEngine``,
a ``VLLMEngine``, or an adapter over a Ray Serve deployment handle.

The checks assert only what holds for real vLLM 0.32 as well as for the fake: shapes,
framing, token accounting and cancellation, never the generated text. Bodies set
``ignore_eos`` (a vLLM sampling parameter) where a check needs an exact token count.
When an adapter spreads requests over several replicas, ``num_unfinished_requests``
must be asked of the replica that serves the stream (use one replica).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any, Protocol

from llm_fleet.deployments.engine import Reply, Route

DONE = "data: [DONE]\n\n"
TIMEOUT_S = 120.0  # a generous ceiling for a small model on CPU; the fake takes ms


class EngineLike(Protocol):
    def generate(
        self, route: Route, body: dict[str, Any], request_id: str
    ) -> AsyncIterator[str | Reply]: ...

    async def num_unfinished_requests(self) -> int: ...


Check = Callable[..., Coroutine[Any, Any, None]]


def _request_id() -> str:
    return f"contract-{uuid.uuid4().hex[:12]}"


def _chat(model_id: str, text: str, **fields: Any) -> dict[str, Any]:
    return {"model": model_id, "messages": [{"role": "user", "content": text}], **fields}


async def _collect(
    engine: EngineLike, route: Route, body: dict[str, Any], request_id: str
) -> list[str | Reply]:
    async with asyncio.timeout(TIMEOUT_S):
        return [item async for item in engine.generate(route, body, request_id)]


async def _one_reply(
    engine: EngineLike, route: Route, body: dict[str, Any], request_id: str
) -> Reply:
    items = await _collect(engine, route, body, request_id)
    assert len(items) == 1, f"a non-streamed answer is exactly one item, got {items!r}"
    assert isinstance(items[0], Reply), f"expected a Reply, got {items[0]!r}"
    return items[0]


def _chunks(items: list[str | Reply]) -> list[dict[str, Any]]:
    """The JSON chunks of a stream, after checking its SSE framing and its ending."""
    assert all(isinstance(item, str) for item in items), f"a stream yields str only: {items!r}"
    frames = [item for item in items if isinstance(item, str)]
    assert frames and frames[-1] == DONE, f"the last frame must be [DONE], got {frames[-1:]}"
    assert frames.count(DONE) == 1, "exactly one [DONE]"
    chunks = []
    for frame in frames[:-1]:
        assert frame.startswith("data: ") and frame.endswith("\n\n"), f"bad SSE frame {frame!r}"
        assert "\n\n" not in frame[:-2], f"one event per frame: {frame!r}"
        chunk = json.loads(frame.removeprefix("data: "))
        assert "error" not in chunk, f"unexpected error frame {chunk!r}"
        chunks.append(chunk)
    return chunks


def _check_usage(usage: Any, *, completion_tokens: int | None = None) -> None:
    assert isinstance(usage, dict), f"usage must be an object, got {usage!r}"
    prompt, completion = usage["prompt_tokens"], usage["completion_tokens"]
    assert isinstance(prompt, int) and prompt > 0, usage
    assert isinstance(completion, int) and completion > 0, usage
    assert usage["total_tokens"] == prompt + completion, usage
    if completion_tokens is not None:
        assert completion == completion_tokens, f"completion_tokens != {completion_tokens}: {usage}"


def _check_head(body: dict[str, Any], obj: str, model_id: str, request_id: str) -> None:
    assert body["object"] == obj, body
    assert body["model"] == model_id, body
    assert isinstance(body["id"], str) and body["id"].endswith(request_id), body
    assert isinstance(body["created"], int), body


def _check_stream(
    chunks: list[dict[str, Any]], obj: str, model_id: str, request_id: str
) -> list[dict[str, Any]]:
    """Checks every chunk's head and the single finish; returns the chunks with choices."""
    for chunk in chunks:
        _check_head(chunk, obj, model_id, request_id)
    with_choices = [c for c in chunks if c["choices"]]
    assert with_choices, "a stream carries at least one choice chunk"
    finishes = [c["choices"][0]["finish_reason"] for c in with_choices]
    assert all(reason is None for reason in finishes[:-1]), finishes
    assert finishes[-1] in ("stop", "length"), finishes
    assert all(c["choices"][0]["index"] == 0 for c in with_choices)
    return with_choices


async def check_chat_non_streaming(engine: EngineLike, model_id: str) -> None:
    """One Reply(200) with a chat.completion body; max_tokens bounds the answer."""
    rid = _request_id()
    reply = await _one_reply(engine, "chat", _chat(model_id, "Say hello.", max_tokens=8), rid)
    assert reply.status == 200 and reply.ok, reply
    _check_head(reply.body, "chat.completion", model_id, rid)
    [choice] = reply.body["choices"]
    assert choice["index"] == 0
    assert choice["message"]["role"] == "assistant"
    assert isinstance(choice["message"]["content"], str)
    assert choice["finish_reason"] in ("stop", "length")
    _check_usage(reply.body["usage"])
    assert reply.body["usage"]["completion_tokens"] <= 8
    if choice["finish_reason"] == "length":
        assert reply.body["usage"]["completion_tokens"] == 8


async def check_chat_max_tokens_honoured(engine: EngineLike, model_id: str) -> None:
    """max_tokens is the exact budget; max_completion_tokens, when sent, wins over it."""
    for fields, expected in (
        ({"max_tokens": 5}, 5),
        ({"max_tokens": 5, "max_completion_tokens": 3}, 3),
    ):
        body = _chat(model_id, "Count upwards from one.", ignore_eos=True, **fields)
        reply = await _one_reply(engine, "chat", body, _request_id())
        assert reply.status == 200, reply
        assert reply.body["choices"][0]["finish_reason"] == "length", reply.body
        _check_usage(reply.body["usage"], completion_tokens=expected)


async def check_chat_streaming_frames_then_done(engine: EngineLike, model_id: str) -> None:
    """SSE frames of chat.completion.chunk, role first, one finish, [DONE] last, no usage."""
    rid = _request_id()
    body = _chat(model_id, "Say hello.", max_tokens=8, stream=True)
    chunks = _chunks(await _collect(engine, "chat", body, rid))
    with_choices = _check_stream(chunks, "chat.completion.chunk", model_id, rid)
    assert with_choices[0]["choices"][0]["delta"].get("role") == "assistant", with_choices[0]
    deltas = [c["choices"][0]["delta"] for c in with_choices]
    assert all(isinstance(d.get("content", ""), str) for d in deltas), deltas
    assert all(c.get("usage") is None for c in chunks), "usage only when include_usage is set"
    assert len(chunks) == len(with_choices), "no chunk without choices unless usage is asked"


async def check_include_usage(engine: EngineLike, model_id: str) -> None:
    """stream_options.include_usage adds one last chunk, with no choices, carrying usage."""
    rid = _request_id()
    body = _chat(
        model_id,
        "Count upwards from one.",
        max_tokens=6,
        ignore_eos=True,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = _chunks(await _collect(engine, "chat", body, rid))
    *content, last = chunks
    assert last["choices"] == [], f"include_usage: the last chunk has no choices, got {last}"
    _check_usage(last.get("usage"), completion_tokens=6)
    _check_head(last, "chat.completion.chunk", model_id, rid)
    _check_stream(content, "chat.completion.chunk", model_id, rid)
    assert all(c.get("usage") is None for c in content), "only the last chunk carries usage"


async def check_completions_non_streaming(engine: EngineLike, model_id: str) -> None:
    """One Reply(200) with a text_completion body and exact usage under ignore_eos."""
    rid = _request_id()
    body = {"model": model_id, "prompt": "The capital of France is", "max_tokens": 5}
    reply = await _one_reply(engine, "completions", {**body, "ignore_eos": True}, rid)
    assert reply.status == 200, reply
    _check_head(reply.body, "text_completion", model_id, rid)
    [choice] = reply.body["choices"]
    assert choice["index"] == 0 and isinstance(choice["text"], str), choice
    assert choice["finish_reason"] == "length", choice
    _check_usage(reply.body["usage"], completion_tokens=5)


async def check_completions_streaming(engine: EngineLike, model_id: str) -> None:
    """text_completion chunks with text deltas, then the usage chunk, then [DONE]."""
    rid = _request_id()
    body = {
        "model": model_id,
        "prompt": "The capital of France is",
        "max_tokens": 4,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    *content, last = _chunks(await _collect(engine, "completions", body, rid))
    assert last["choices"] == [], f"include_usage: the last chunk has no choices, got {last}"
    _check_usage(last.get("usage"), completion_tokens=4)
    with_choices = _check_stream(content, "text_completion", model_id, rid)
    assert all(isinstance(c["choices"][0]["text"], str) for c in with_choices)


async def check_context_overflow_is_400(
    engine: EngineLike, model_id: str, *, max_model_len: int = 2048
) -> None:
    """A prompt longer than the context is one Reply(400) naming the context length,
    streamed or not, before any frame."""
    prompt = " ".join(["hello"] * (2 * max_model_len))
    for stream in (False, True):
        body = _chat(model_id, prompt, max_tokens=16, stream=stream)
        reply = await _one_reply(engine, "chat", body, _request_id())
        assert reply.status == 400 and not reply.ok, f"expected a 400 Reply, got {reply}"
        error = reply.body["error"]
        assert "maximum context length" in error["message"], error
        assert isinstance(error["type"], str), error


async def check_prompt_plus_max_tokens_over_context_is_400(
    engine: EngineLike, model_id: str, *, max_model_len: int = 2048
) -> None:
    """A prompt that fits, with a max_tokens that does not fit after it, is refused.

    vLLM alone would shrink max_tokens to the room left; the contract is the OpenAI
    rule: 400, code-worthy message naming the context length and param max_tokens.
    """
    prompt = " ".join(["hello"] * (max_model_len // 4))
    body = _chat(model_id, prompt, max_tokens=max_model_len - 16)
    reply = await _one_reply(engine, "chat", body, _request_id())
    assert reply.status == 400, f"expected a 400 Reply, got {reply}"
    error = reply.body["error"]
    assert "maximum context length" in error["message"] and str(max_model_len) in error["message"]
    assert error["param"] == "max_tokens", error
    # The same prompt with a max_tokens that fits is served.
    fits = _chat(model_id, prompt, max_tokens=4)
    assert (await _one_reply(engine, "chat", fits, _request_id())).status == 200


async def _aclose(stream: AsyncIterator[str | Reply]) -> None:
    aclose = getattr(stream, "aclose", None)
    assert aclose is not None, "generate() must return an async generator (one with aclose)"
    await aclose()


async def _settles_to_zero(engine: EngineLike, within_s: float) -> int:
    deadline = time.monotonic() + within_s
    while (left := await engine.num_unfinished_requests()) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    return left


async def check_cancel_aborts(
    engine: EngineLike, model_id: str, *, max_tokens: int = 1000, within_s: float = 2.0
) -> None:
    """Closing a stream after its first frames aborts the generation within ``within_s``.

    ``max_tokens`` must take the engine much longer than ``within_s`` to generate, or
    a generation that finished on its own would pass for an aborted one.
    """
    body = _chat(model_id, "Count upwards from one.", max_tokens=max_tokens, ignore_eos=True)
    stream = engine.generate("chat", {**body, "stream": True}, _request_id())
    try:
        async with asyncio.timeout(TIMEOUT_S):
            first = await anext(stream)
            second = await anext(stream)
        assert isinstance(first, str) and isinstance(second, str), (first, second)
        assert await engine.num_unfinished_requests() >= 1, "the stream is being generated"
    finally:
        await _aclose(stream)
    left = await _settles_to_zero(engine, within_s)
    assert left == 0, f"{left} request(s) still generating {within_s}s after aclose()"


async def check_cancel_non_streaming_aborts(
    engine: EngineLike, model_id: str, *, max_tokens: int = 1000, within_s: float = 2.0
) -> None:
    """Cancelling the task that awaits a non-streamed answer aborts its generation.

    This is what the router does when its client leaves before the answer.
    """
    body = _chat(model_id, "Count upwards from one.", max_tokens=max_tokens, ignore_eos=True)
    stream = engine.generate("chat", body, _request_id())
    task = asyncio.ensure_future(anext(stream))
    try:
        running = await _started(engine, within_s=TIMEOUT_S)
        assert running, "the request never showed up in num_unfinished_requests()"
        assert not task.done(), "the answer came before it could be cancelled"
    finally:
        task.cancel()
        await asyncio.wait({task})
        await _aclose(stream)
    # vLLM may answer a cancelled non-streamed request with an error Reply instead.
    assert task.cancelled() or isinstance(task.result(), Reply), task
    left = await _settles_to_zero(engine, within_s)
    assert left == 0, f"{left} request(s) still generating {within_s}s after cancel()"


async def _started(engine: EngineLike, *, within_s: float) -> bool:
    deadline = time.monotonic() + within_s
    while not await engine.num_unfinished_requests():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


CHAT_CHECKS: tuple[Check, ...] = (
    check_chat_non_streaming,
    check_chat_max_tokens_honoured,
    check_chat_streaming_frames_then_done,
    check_include_usage,
    check_context_overflow_is_400,
    check_prompt_plus_max_tokens_over_context_is_400,
    check_cancel_aborts,
    check_cancel_non_streaming_aborts,
)
"""Checks of /v1/chat/completions; run them with a chat model."""

COMPLETIONS_CHECKS: tuple[Check, ...] = (
    check_completions_non_streaming,
    check_completions_streaming,
)
"""Checks of /v1/completions; any model with a tokenizer serves them."""

ALL_CHECKS: tuple[Check, ...] = CHAT_CHECKS + COMPLETIONS_CHECKS
