"""The engine contract against FakeEngine, and proof that each kind of check can fail."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from typing import Any

import pytest

from llm_fleet.deployments.engine import Reply, Route
from tests.contract.engine_contract import (
    CHAT_CHECKS,
    COMPLETIONS_CHECKS,
    Check,
    check_cancel_aborts,
    check_cancel_non_streaming_aborts,
    check_chat_max_tokens_honoured,
    check_chat_streaming_frames_then_done,
    check_context_overflow_is_400,
    check_include_usage,
)
from tests.fake_engine import FakeEngine

CHAT_MODEL = "smollm2-135m-instruct"
COMPLETIONS_MODEL = "gemma-3-270m"


@pytest.mark.parametrize("check", CHAT_CHECKS, ids=lambda check: check.__name__)
def test_fake_engine_meets_the_chat_contract(check: Check) -> None:
    asyncio.run(check(FakeEngine(CHAT_MODEL), CHAT_MODEL))


@pytest.mark.parametrize("check", COMPLETIONS_CHECKS, ids=lambda check: check.__name__)
def test_fake_engine_meets_the_completions_contract(check: Check) -> None:
    asyncio.run(check(FakeEngine(COMPLETIONS_MODEL), COMPLETIONS_MODEL))


class _BrokenEngine:
    """A FakeEngine with one fault, to show the checks catch that fault."""

    def __init__(self, fault: str, engine: FakeEngine | None = None) -> None:
        self.fault = fault
        self.inner = engine or FakeEngine(CHAT_MODEL)
        self._pumps: set[asyncio.Task[None]] = set()

    async def num_unfinished_requests(self) -> int:
        return await self.inner.num_unfinished_requests()

    async def generate(
        self, route: Route, body: dict[str, Any], request_id: str
    ) -> AsyncGenerator[str | Reply, None]:
        if self.fault == "drops stream_options":
            body = {k: v for k, v in body.items() if k != "stream_options"}
        if self.fault == "ignores max_tokens":
            body = {
                k: v for k, v in body.items() if k not in ("max_tokens", "max_completion_tokens")
            }
        if self.fault == "never aborts":
            async for item in self._detached(route, body, request_id):
                yield item
            return
        async for item in self.inner.generate(route, body, request_id):
            if not (self.fault == "no [DONE]" and item == "data: [DONE]\n\n"):
                yield item

    async def _detached(
        self, route: Route, body: dict[str, Any], request_id: str
    ) -> AsyncGenerator[str | Reply, None]:
        """Generation in a task of its own, which closing the stream does not stop."""
        queue: asyncio.Queue[str | Reply | None] = asyncio.Queue()

        async def pump() -> None:
            async for item in self.inner.generate(route, body, request_id):
                await queue.put(item)
            await queue.put(None)

        task = asyncio.ensure_future(pump())
        self._pumps.add(task)
        while (item := await queue.get()) is not None:
            yield item


@pytest.mark.parametrize(
    ("fault", "check", "complaint"),
    [
        ("no [DONE]", check_chat_streaming_frames_then_done, "must be \\[DONE\\]"),
        ("drops stream_options", check_include_usage, "the last chunk has no choices"),
        ("ignores max_tokens", check_chat_max_tokens_honoured, "completion_tokens != 5"),
        ("never aborts", check_cancel_aborts, "still generating .* after aclose"),
        ("never aborts", check_cancel_non_streaming_aborts, "still generating .* after cancel"),
    ],
)
def test_a_broken_engine_fails_the_check(fault: str, check: Check, complaint: str) -> None:
    # Slow only where the check must outlast the generation it cancels.
    slow = fault == "never aborts"
    engine = _BrokenEngine(fault, FakeEngine(CHAT_MODEL, token_delay_s=0.005 if slow else 0))
    kwargs = {"within_s": 0.3} if slow else {}
    with pytest.raises(AssertionError, match=complaint):
        asyncio.run(check(engine, CHAT_MODEL, **kwargs))


def test_an_engine_that_admits_any_prompt_fails_the_context_check() -> None:
    roomy = FakeEngine(CHAT_MODEL, max_model_len=1_000_000, token_delay_s=0)
    with pytest.raises(AssertionError, match="expected a 400 Reply"):
        asyncio.run(check_context_overflow_is_400(roomy, CHAT_MODEL, max_model_len=2048))
