"""The router's happy paths, seen by an HTTP client and by the official openai SDK."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import openai
import pytest
from fastapi.testclient import TestClient

from tests.fake_engine import FakeEngine
from tests.fakes import (
    CHAT_MODEL,
    COMPLETIONS_MODEL,
    DEFAULT_MAX_TOKENS,
    NOT_ALLOWED_MODEL,
    fleet_config,
    make_fleet,
    replica_client,
)

WORDS_40 = " ".join(f"w{i}" for i in range(40))

if TYPE_CHECKING:
    import httpx2  # what starlette's TestClient and the openai SDK are built on


@pytest.fixture
def http() -> Iterator[TestClient]:
    with TestClient(make_fleet().app) as client:
        yield client


@pytest.fixture
def sdk(http: TestClient) -> openai.OpenAI:
    return openai.OpenAI(
        base_url="http://testserver/v1", api_key="unused", http_client=http, max_retries=0
    )


def sse_chunks(response: httpx2.Response) -> list[dict[str, Any]]:
    """The JSON chunks of an SSE body, after checking every frame and the [DONE] ending."""
    assert response.headers["content-type"].startswith("text/event-stream")
    text = response.text
    assert text.endswith("data: [DONE]\n\n"), text[-200:]
    frames = text.split("\n\n")[:-1]
    assert frames[-1] == "data: [DONE]" and frames.count("data: [DONE]") == 1
    assert all(frame.startswith("data: ") for frame in frames), frames
    return [json.loads(frame.removeprefix("data: ")) for frame in frames[:-1]]


def chat(text: str, **fields: Any) -> dict[str, Any]:
    return {"model": CHAT_MODEL, "messages": [{"role": "user", "content": text}], **fields}


def test_models_lists_the_configured_models_that_have_a_client(sdk: openai.OpenAI) -> None:
    assert sorted(model.id for model in sdk.models.list()) == [COMPLETIONS_MODEL, CHAT_MODEL]


def test_a_client_for_an_unconfigured_model_is_not_served() -> None:
    configured = fleet_config().models[0]
    stray_model = configured.model_copy(update={"id": "stray-model"})
    stray, _ = replica_client(stray_model, FakeEngine("stray-model"))
    with TestClient(make_fleet(extra_clients={"stray-model": stray}).app) as http:
        listed = [card["id"] for card in http.get("/v1/models").json()["data"]]
        chat_reply = http.post("/v1/chat/completions", json={**chat("hi"), "model": "stray-model"})
    assert "stray-model" not in listed
    assert chat_reply.status_code == 404


def test_models_by_id(http: TestClient, sdk: openai.OpenAI) -> None:
    card = http.get(f"/v1/models/{CHAT_MODEL}").json()
    assert isinstance(card.pop("created"), int)
    assert card == {"id": CHAT_MODEL, "object": "model", "owned_by": "llm-fleet"}
    assert sdk.models.retrieve(COMPLETIONS_MODEL).id == COMPLETIONS_MODEL
    for unknown in (NOT_ALLOWED_MODEL, "no-such-model"):
        with pytest.raises(openai.NotFoundError) as caught:
            sdk.models.retrieve(unknown)
        assert caught.value.code == "model_not_found"


def test_chat_answer_through_the_sdk(sdk: openai.OpenAI) -> None:
    raw = sdk.chat.completions.with_raw_response.create(
        model=CHAT_MODEL,
        messages=[
            {"role": "system", "content": "Echo the user."},
            {"role": "user", "content": "alpha beta gamma"},
        ],
        max_tokens=8,
    )
    completion = raw.parse()
    assert completion.choices[0].message.content == "alpha beta gamma"
    assert completion.choices[0].finish_reason == "stop"
    assert completion.model == CHAT_MODEL
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (6, 3)
    # The engine names its answer after the router's request id.
    assert completion.id.endswith(raw.headers["x-request-id"])


def test_chat_stream_through_the_sdk(sdk: openai.OpenAI) -> None:
    stream = sdk.chat.completions.create(
        model=CHAT_MODEL,
        messages=[{"role": "user", "content": "alpha beta gamma"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "alpha beta gamma"
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 3


def test_chat_stream_is_framed_as_sse_one_token_per_frame(http: TestClient) -> None:
    response = http.post("/v1/chat/completions", json=chat("one two three four", stream=True))
    assert response.status_code == 200
    assert response.headers["cache-control"] == "no-cache"
    assert response.headers["x-accel-buffering"] == "no"
    chunks = sse_chunks(response)
    deltas = [chunk["choices"][0]["delta"] for chunk in chunks]
    assert deltas[0]["role"] == "assistant"
    assert [d["content"] for d in deltas[1:]] == ["one", " two", " three", " four"]
    assert [c["choices"][0]["finish_reason"] for c in chunks][-2:] == [None, "stop"]
    assert all("usage" not in chunk for chunk in chunks)


def test_completions_through_the_sdk(sdk: openai.OpenAI) -> None:
    completion = sdk.completions.create(
        model=COMPLETIONS_MODEL, prompt="one two three", max_tokens=2
    )
    assert completion.object == "text_completion"
    assert completion.choices[0].text == "one two"
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage is not None and completion.usage.completion_tokens == 2


def test_completions_stream_with_usage(http: TestClient) -> None:
    body = {
        "model": COMPLETIONS_MODEL,
        "prompt": "one two three",
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    chunks = sse_chunks(http.post("/v1/completions", json=body))
    assert "".join(c["choices"][0]["text"] for c in chunks[:-1]) == "one two three"
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}


def test_completions_stream_through_the_sdk(sdk: openai.OpenAI) -> None:
    stream = sdk.completions.create(
        model=COMPLETIONS_MODEL, prompt="one two three", max_tokens=2, stream=True
    )
    assert "".join(chunk.choices[0].text for chunk in stream) == "one two"


@pytest.mark.parametrize("route", ["chat", "completions"])
def test_default_max_tokens_applies_when_the_client_sends_none(
    http: TestClient, route: str
) -> None:
    if route == "chat":
        response = http.post("/v1/chat/completions", json=chat(WORDS_40))
    else:
        response = http.post(
            "/v1/completions", json={"model": COMPLETIONS_MODEL, "prompt": WORDS_40}
        )
    body = response.json()
    assert body["usage"]["completion_tokens"] == DEFAULT_MAX_TOKENS
    assert body["choices"][0]["finish_reason"] == "length"


def test_max_tokens_within_the_limit_is_the_clients_choice(http: TestClient) -> None:
    short = http.post("/v1/chat/completions", json=chat(WORDS_40, max_tokens=5)).json()
    longer = http.post("/v1/chat/completions", json=chat(WORDS_40, max_completion_tokens=30)).json()
    assert short["choices"][0]["message"]["content"] == "w0 w1 w2 w3 w4"
    assert longer["usage"]["completion_tokens"] == 30


@pytest.mark.parametrize("value", [10, 5000, "a"])
def test_completions_ignore_max_completion_tokens_and_get_the_default(
    http: TestClient, value: object
) -> None:
    # max_completion_tokens is a chat field that vLLM's completions ignore: it must
    # neither bypass the default nor be checked against the limit.
    body = {"model": COMPLETIONS_MODEL, "prompt": WORDS_40, "max_completion_tokens": value}
    response = http.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == DEFAULT_MAX_TOKENS
