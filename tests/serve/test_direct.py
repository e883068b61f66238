"""The direct path on the shared fleet: SmolLM2 at /m/<id>/v1, served by its own replicas.

``serve_config.local.yaml`` gives SmolLM2 ``direct: true``: its replicas are the
ingress of the app ``fleet.smollm2-135m-instruct`` and the router reaches the same
replicas over a handle (``router/direct.py``). The shared fleet has no API keys; keys
and limits on this door run the router's own ``create_app`` (unit-tested route by route).
"""

from __future__ import annotations

import time

import httpx
import openai
import pytest

from tests.serve.conftest import (
    APP,
    CHAT_MODEL,
    CHAT_MODEL_APP,
    COMPLETION_MODEL,
    DIRECT_PREFIX,
    Fleet,
    deployment_handle,
)

pytestmark = [pytest.mark.serve, pytest.mark.slow]

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def direct(fleet: Fleet) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"{fleet.base_url}{DIRECT_PREFIX}/v1", api_key="unused", max_retries=0
    )


def test_direct_path_answers_like_the_router(fleet: Fleet, direct: openai.OpenAI) -> None:
    """Same model, same engine, same answer (greedy) through either door."""
    routed = openai.OpenAI(base_url=f"{fleet.base_url}/v1", api_key="unused", max_retries=0)
    ask = {"model": CHAT_MODEL, "messages": FRANCE, "temperature": 0, "max_tokens": 12}
    raw = direct.chat.completions.with_raw_response.create(**ask)  # type: ignore[call-overload]
    assert raw.headers["x-request-id"]
    assert "engine;dur=" in raw.headers["server-timing"]
    reply = raw.parse()
    assert reply.model == CHAT_MODEL and reply.choices[0].message.content
    assert reply.usage is not None and reply.usage.completion_tokens > 0
    assert routed.chat.completions.create(**ask).choices[0].message.content == (
        reply.choices[0].message.content
    )


def test_direct_path_streams_chunks_then_usage(direct: openai.OpenAI) -> None:
    chunks = list(
        direct.chat.completions.create(
            model=CHAT_MODEL,
            messages=FRANCE,
            max_tokens=16,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text and len(chunks) > 3
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    completion = direct.completions.create(model=CHAT_MODEL, prompt="Paris is", max_tokens=4)
    assert completion.choices[0].text


def test_direct_path_serves_one_model(fleet: Fleet, direct: openai.OpenAI) -> None:
    assert [m.id for m in direct.models.list()] == [CHAT_MODEL]
    with pytest.raises(openai.NotFoundError) as missing:
        direct.chat.completions.create(model=COMPLETION_MODEL, messages=FRANCE, max_tokens=2)
    assert missing.value.code == "model_not_found"
    bad = httpx.post(
        f"{fleet.base_url}{DIRECT_PREFIX}/v1/chat/completions",
        json={"model": CHAT_MODEL, "messages": "not a list"},
        headers={"X-Request-Id": "direct-bad-1"},
        timeout=30,
    )
    assert bad.status_code == 400
    assert bad.json()["error"]["type"] == "invalid_request_error"
    assert bad.headers["x-request-id"] == "direct-bad-1"
    ready = httpx.get(f"{fleet.base_url}{DIRECT_PREFIX}/health/ready", timeout=30)
    assert ready.status_code == 200 and ready.json()["models"][CHAT_MODEL]["state"] == "ready"


@pytest.mark.usefixtures("ray_driver")
def test_one_engine_behind_both_doors() -> None:
    """SmolLM2's deployment exists once, in its direct app; the router app has none."""
    from ray import serve

    applications = serve.status().applications
    assert CHAT_MODEL not in applications[APP].deployments
    assert CHAT_MODEL in applications[CHAT_MODEL_APP].deployments


@pytest.mark.usefixtures("ray_driver")
def test_direct_stream_disconnect_aborts_generation(fleet: Fleet) -> None:
    body = {
        "model": CHAT_MODEL,
        "messages": [{"role": "user", "content": "Write a very long story about a dragon."}],
        "max_tokens": 1000,
        "stream": True,
        "ignore_eos": True,
    }
    url = f"{fleet.base_url}{DIRECT_PREFIX}/v1/chat/completions"
    handle = deployment_handle(CHAT_MODEL)

    def running() -> int:
        return int(handle.num_unfinished_requests.remote().result())

    with httpx.stream("POST", url, json=body, timeout=60) as reply:
        assert reply.status_code == 200
        lines = reply.iter_lines()
        for _ in range(5):
            next(lines)
        assert running() == 1
        dropped = time.monotonic()
    while running() != 0:
        assert time.monotonic() - dropped < 5, "the engine kept generating for a gone client"
        time.sleep(0.1)
