"""Models served from an S3 server and an HF mirror on loopback, and one whose store is
unreachable, all in the shared fleet (see conftest)."""

from __future__ import annotations

import time

import openai
import pytest

from tests.serve.conftest import (
    APP,
    CHAT_MODEL,
    HF_MODEL,
    S3_MODEL,
    UNREACHABLE_MODEL,
    WEIGHTS_BUCKET,
    Fleet,
)
from tests.weights.s3server import SECRET_ACCESS_KEY

pytestmark = [pytest.mark.serve, pytest.mark.slow]

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def client(fleet: Fleet) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{fleet.base_url}/v1", api_key="unused", max_retries=0)


def _answer(client: openai.OpenAI, model: str) -> str:
    reply = client.chat.completions.create(
        model=model, messages=FRANCE, temperature=0, max_tokens=30
    )
    return reply.choices[0].message.content or ""


def _answer_when_up(client: openai.OpenAI, model: str) -> tuple[str, list[str]]:
    """Retry as a client should while the model starts: on 503, after Retry-After.

    Returns the answer and the Retry-After values of the 503s met on the way; each 503
    must come within 10 s: refused, not held while the model loads (a download and an
    engine start take a minute here; a loaded 2-core machine takes up to 2 s to refuse).
    """
    waits: list[str] = []
    deadline = time.monotonic() + 300
    while True:
        started = time.monotonic()
        try:
            return _answer(client, model), waits
        except openai.APIStatusError as exc:
            body = exc.body if isinstance(exc.body, dict) else {}
            if exc.status_code != 503 or body.get("code") != "model_not_ready":
                raise
            assert time.monotonic() - started < 10.0, "a 503 came late"
            if time.monotonic() > deadline:
                raise
            waits.append(exc.response.headers["retry-after"])
            time.sleep(int(waits[-1]))


def test_s3_model_scaled_to_zero_says_when_to_retry_then_answers(client: openai.OpenAI) -> None:
    local = _answer(client, CHAT_MODEL)
    assert "Paris" in local
    # Idle since the fixture loaded it: scaled to zero, and it rejects (the default).
    answer, waits = _answer_when_up(client, S3_MODEL)
    assert answer == local
    assert waits and set(waits) == {"2"}, waits


def test_hf_model_scaled_to_zero_holds_the_request_until_it_answers(client: openai.OpenAI) -> None:
    local = _answer(client, CHAT_MODEL)
    # action: queue: one plain request waits for the replica that it asks for.
    slow = client.with_options(timeout=300)
    started = time.monotonic()
    assert _answer(slow, HF_MODEL) == local
    assert time.monotonic() - started > 2, "the model was not scaled to zero"


def test_replica_logged_its_download_progress(fleet: Fleet) -> None:
    progress = [
        line
        for line in fleet.log.read_text(errors="replace").splitlines()
        if f"s3://{WEIGHTS_BUCKET}/smollm2:" in line and "MB/s" in line and "ETA" in line
    ]
    assert progress, "no download progress line from the S3 model's replica"


@pytest.mark.usefixtures("ray_driver")
def test_unreachable_store_fails_that_model_with_the_reason(client: openai.OpenAI) -> None:
    from ray import serve

    deadline = time.monotonic() + 300
    while True:
        status = serve.status().applications[APP].deployments[UNREACHABLE_MODEL]
        if "cannot list" in status.message or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert "cannot list" in status.message, status
    assert "s3://fleet-weights/gone" in status.message
    assert "EndpointConnectionError" in status.message
    assert SECRET_ACCESS_KEY not in status.message
    assert str(status.status).endswith(("DEPLOY_FAILED", "UNHEALTHY", "UPDATING")), status
    # The others keep serving.
    assert "Paris" in _answer(client, CHAT_MODEL)
    assert "Paris" in _answer_when_up(client, S3_MODEL)[0]
