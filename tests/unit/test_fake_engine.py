"""FakeEngine's own rules, beyond the shared contract (tests/contract)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from llm_fleet.deployments.config import ModelConfig
from llm_fleet.deployments.engine import Reply, Route
from tests.fake_engine import COMPLETION_DEFAULT_MAX_TOKENS, FakeEngine


def answer(engine: FakeEngine, route: Route, body: dict[str, Any]) -> Reply:
    async def first() -> Reply:
        items = [item async for item in engine.generate(route, body, "r")]
        assert len(items) == 1 and isinstance(items[0], Reply), items
        return items[0]

    return asyncio.run(first())


def chat(text: str, **fields: Any) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": text}], **fields}


def test_chat_echoes_the_last_user_message() -> None:
    body = {
        "model": "m",
        "messages": [
            {"role": "user", "content": "first question"},
            {"role": "assistant", "content": "an answer"},
            {"role": "user", "content": [{"type": "text", "text": "second one"}]},
        ],
    }
    reply = answer(FakeEngine(token_delay_s=0), "chat", body)
    assert reply.body["choices"][0]["message"]["content"] == "second one"
    assert reply.body["usage"]["prompt_tokens"] == 6


def test_ignore_eos_repeats_the_words_until_the_budget() -> None:
    reply = answer(FakeEngine(token_delay_s=0), "chat", chat("a b", max_tokens=5, ignore_eos=True))
    assert reply.body["choices"][0]["message"]["content"] == "a b a b a"


def test_max_tokens_past_the_context_is_refused_not_clamped() -> None:
    engine = FakeEngine(max_model_len=10, token_delay_s=0)
    reply = answer(engine, "chat", chat("one two three four", max_tokens=7, ignore_eos=True))
    assert reply.status == 400
    assert "maximum context length is 10" in reply.body["error"]["message"]
    exact = answer(engine, "chat", chat("one two three four", max_tokens=6, ignore_eos=True))
    assert exact.body["usage"] == {"prompt_tokens": 4, "completion_tokens": 6, "total_tokens": 10}


def test_a_prompt_that_fills_the_context_is_refused() -> None:
    reply = answer(FakeEngine(max_model_len=4, token_delay_s=0), "chat", chat("a b c d"))
    assert reply.status == 400
    assert reply.body["error"]["param"] == "input_tokens"
    assert "maximum context length is 4 tokens" in reply.body["error"]["message"]


def test_completions_default_to_vllms_16_tokens_and_take_token_ids() -> None:
    engine = FakeEngine(token_delay_s=0)
    text = answer(engine, "completions", {"prompt": "x", "ignore_eos": True})
    ids = answer(engine, "completions", {"prompt": [7, 8, 9], "max_tokens": 2})
    assert text.body["usage"]["completion_tokens"] == COMPLETION_DEFAULT_MAX_TOKENS
    assert ids.body["choices"][0]["text"] == "7 8"
    assert ids.body["usage"]["prompt_tokens"] == 3


@pytest.mark.parametrize(
    ("route", "body", "param"),
    [
        ("chat", chat("hi", n=2), "n"),
        ("chat", chat("hi", max_tokens=0), "max_tokens"),
        ("chat", {"model": "m"}, "messages"),
        ("completions", {"prompt": ["a", "b"]}, "prompt"),
    ],
)
def test_what_the_fake_cannot_serve_is_a_400_reply(
    route: Route, body: dict[str, Any], param: str
) -> None:
    reply = answer(FakeEngine(token_delay_s=0), route, body)
    assert (reply.status, reply.body["error"]["param"]) == (400, param)


def test_built_from_config_it_starts_and_reports_health() -> None:
    model = ModelConfig(id="tiny", source="embedded://tiny", engine_args={"max_model_len": 512})
    engine = FakeEngine.from_config(model, Path("/nonexistent"))

    async def lifecycle() -> None:
        with pytest.raises(RuntimeError):
            await engine.check_health()
        info = await engine.start()
        assert (info.model_id, info.max_model_len) == ("tiny", 512)
        await engine.check_health()
        await engine.shutdown()
        with pytest.raises(RuntimeError):
            await engine.check_health()

    asyncio.run(lifecycle())
