"""The OpenAI API through the router, on real Ray Serve and real vLLM (CPU)."""

from __future__ import annotations

import itertools
import json
import threading
import time
from typing import Any

import httpx
import openai
import pytest

from tests.serve.conftest import (
    BROKEN_ENGINE_MODEL,
    CHAT_MODEL,
    COMPLETION_MODEL,
    HF_MODEL,
    S3_MODEL,
    UNREACHABLE_MODEL,
    Fleet,
    deployment_handle,
)

pytestmark = [pytest.mark.serve, pytest.mark.slow]

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
LONG_STORY = [{"role": "user", "content": "Write a very long story about a dragon."}]


@pytest.fixture(scope="module")
def client(fleet: Fleet) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{fleet.base_url}/v1", api_key="unused", max_retries=0)


def test_models_lists_every_configured_model(client: openai.OpenAI) -> None:
    ids = {model.id for model in client.models.list()}
    assert ids == {
        CHAT_MODEL,
        COMPLETION_MODEL,
        S3_MODEL,
        HF_MODEL,
        UNREACHABLE_MODEL,
        BROKEN_ENGINE_MODEL,
    }


def test_chat_answers_paris(client: openai.OpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model=CHAT_MODEL, messages=FRANCE, temperature=0, max_tokens=30
    )
    reply = raw.parse()
    assert "Paris" in (reply.choices[0].message.content or "")
    assert reply.model == CHAT_MODEL
    assert reply.usage is not None and reply.usage.completion_tokens > 0
    assert raw.headers.get("x-request-id")


def test_request_id_is_taken_from_the_client(fleet: Fleet) -> None:
    reply = httpx.post(
        f"{fleet.base_url}/v1/chat/completions",
        json={"model": "no-such-model", "messages": FRANCE},
        headers={"X-Request-Id": "trace-abc-123"},
    )
    assert reply.status_code == 404
    assert reply.headers.get_list("x-request-id") == ["trace-abc-123"]
    assert reply.json()["error"]["request_id"] == "trace-abc-123"


def test_chat_streams_chunk_by_chunk_then_usage(client: openai.OpenAI) -> None:
    arrivals: list[float] = []
    texts: list[str] = []
    usage = None
    started = time.monotonic()
    stream = client.chat.completions.create(
        model=CHAT_MODEL,
        messages=LONG_STORY,
        max_tokens=40,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            arrivals.append(time.monotonic())
            texts.append(chunk.choices[0].delta.content)
        if chunk.usage is not None:
            usage = chunk.usage
    assert len(texts) >= 20, texts
    # Relayed as generated, not buffered: the chunks arrive spread over the generation.
    # A gateway that buffered the answer would hand every chunk over in one burst at the
    # end. The client is not held to one chunk per read: on this 2-core box a busy
    # moment (another engine's replica starting) can leave a few frames waiting in the
    # socket, which then parse in one read (seen in CI: 8 bursts over the answer).
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    bursts = 1 + sum(1 for gap in gaps if gap > 0.002)
    assert bursts >= 4, gaps
    # The span is judged on its own, not against the time to the first chunk: the prompt's
    # prefill is not part of the relay, and on a busy box it alone took 2.75 s of a 3.4 s
    # request (seen in CI) while the 40 tokens still arrived over 0.6 s in many reads.
    # A buffered answer lands within a few milliseconds.
    assert arrivals[-1] - arrivals[0] >= 0.1, (started, arrivals)
    assert usage is not None and usage.completion_tokens == 40


def test_stream_ends_with_done_frame(fleet: Fleet) -> None:
    body = {
        "model": CHAT_MODEL,
        "messages": FRANCE,
        "max_tokens": 8,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    frames = []
    with httpx.stream("POST", f"{fleet.base_url}/v1/chat/completions", json=body) as reply:
        assert reply.status_code == 200
        assert reply.headers["content-type"].startswith("text/event-stream")
        raw = "".join(reply.iter_text())
    frames = [frame for frame in raw.split("\n\n") if frame]
    assert all(frame.startswith("data: ") for frame in frames)
    assert frames[-1] == "data: [DONE]"
    payloads = [json.loads(frame[6:]) for frame in frames[:-1]]
    assert payloads[-1]["choices"] == [] and payloads[-1]["usage"]["completion_tokens"] == 8


def test_completions_on_gemma(client: openai.OpenAI) -> None:
    reply = client.completions.create(
        model=COMPLETION_MODEL, prompt="The capital of France is", max_tokens=12, temperature=0
    )
    text = reply.choices[0].text
    assert any(word in text for word in ("Paris", "France", "capital")), text


def test_completions_stream_on_gemma(client: openai.OpenAI) -> None:
    stream = client.completions.create(
        model=COMPLETION_MODEL, prompt="One, two, three,", max_tokens=10, stream=True
    )
    pieces = [chunk.choices[0].text for chunk in stream if chunk.choices]
    assert len(pieces) >= 5 and "".join(pieces).strip()


def test_unknown_model_is_404_in_openai_shape(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="gpt-17", messages=FRANCE)
    error = err.value.body
    assert isinstance(error, dict)
    assert error["code"] == "model_not_found" and error["param"] == "model"
    assert set(error) >= {"message", "type", "param", "code", "request_id"}


def test_max_tokens_over_the_limit_is_400_naming_it(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=CHAT_MODEL, messages=FRANCE, max_tokens=5000)
    assert "1024" in str(err.value) and err.value.code == "max_tokens_exceeded"


def test_prompt_plus_max_tokens_over_context_is_400(client: openai.OpenAI) -> None:
    long_prompt = "word " * 1500
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            model=CHAT_MODEL, messages=[{"role": "user", "content": long_prompt}], max_tokens=1000
        )
    assert err.value.code == "context_length_exceeded"
    assert "2048" in str(err.value)


@pytest.mark.parametrize(
    "body",
    [
        {"model": CHAT_MODEL, "messages": "not a list"},
        {"model": CHAT_MODEL},
        {"model": 7, "messages": FRANCE},
        {"model": CHAT_MODEL, "messages": FRANCE, "max_tokens": "ten"},
        {"model": CHAT_MODEL, "messages": FRANCE, "temperature": "hot"},
        {"model": CHAT_MODEL, "messages": FRANCE, "n": "two"},
    ],
)
def test_bad_fields_are_400_never_422_or_500(fleet: Fleet, body: dict[str, Any]) -> None:
    reply = httpx.post(f"{fleet.base_url}/v1/chat/completions", json=body, timeout=60)
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["type"] == "invalid_request_error"


def test_malformed_json_is_400(fleet: Fleet) -> None:
    reply = httpx.post(
        f"{fleet.base_url}/v1/chat/completions",
        content=b'{"model": ',
        headers={"Content-Type": "application/json"},
    )
    assert reply.status_code == 400
    assert reply.json()["error"]["code"] == "invalid_json"


def _running(model: str) -> int:
    return int(deployment_handle(model).num_unfinished_requests.remote().result())


def _wait_running(model: str, predicate: Any, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while True:
        count = _running(model)
        if predicate(count) or time.monotonic() > deadline:
            return count
        time.sleep(0.1)


@pytest.mark.usefixtures("ray_driver")
def test_stream_disconnect_aborts_generation(fleet: Fleet) -> None:
    # ignore_eos (vLLM): the generation surely outlasts the test, however the model samples.
    body = {
        "model": CHAT_MODEL,
        "messages": LONG_STORY,
        "max_tokens": 1000,
        "stream": True,
        "ignore_eos": True,
    }
    with httpx.stream("POST", f"{fleet.base_url}/v1/chat/completions", json=body) as reply:
        lines = reply.iter_lines()
        for _ in range(5):
            next(lines)
        assert _running(CHAT_MODEL) == 1
        dropped = time.monotonic()
    # Leaving the block closes the connection: the client is gone.
    assert _wait_running(CHAT_MODEL, lambda n: n == 0, timeout=5) == 0
    assert time.monotonic() - dropped < 3


@pytest.mark.usefixtures("ray_driver")
def test_non_streaming_disconnect_aborts_generation(fleet: Fleet) -> None:
    body = {"model": CHAT_MODEL, "messages": LONG_STORY, "max_tokens": 1000, "ignore_eos": True}
    outcome: list[BaseException] = []

    def call() -> None:
        try:
            httpx.post(f"{fleet.base_url}/v1/chat/completions", json=body, timeout=4)
        except httpx.TimeoutException as exc:  # the client gives up and hangs up
            outcome.append(exc)

    worker = threading.Thread(target=call)
    worker.start()
    assert _wait_running(CHAT_MODEL, lambda n: n == 1, timeout=4) == 1
    worker.join()
    assert outcome, "the 1000-token answer finished before the client timed out"
    assert _wait_running(CHAT_MODEL, lambda n: n == 0, timeout=5) == 0
