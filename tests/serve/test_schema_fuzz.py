"""schemathesis against the live gateway's ``/openapi.json``: no generated request, valid
or not, gets a server error, and every refusal is an OpenAI error body with a request id.

The app is llm-fleet's real stack (Serve proxy, router replica, model replica) over the
fake engine (``tests/serve/fake_apps.py``), so a request the router lets through costs
milliseconds: its model allows 16 output tokens, and a body naming a model gets the
served one half the time (``tests/schema_fuzz.py``; the rest exercise the unknown-model
path). Bounded: ``MAX_EXAMPLES`` generated requests per operation.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
import schemathesis

from tests.schema_fuzz import fuzz, sender
from tests.serve.conftest import Fleet
from tests.serve.fake_apps import ONE_ROUTER, deployed, fake_model

pytestmark = [pytest.mark.serve, pytest.mark.slow]

APP = "fuzz"
MODEL = "fuzz-model"
MAX_EXAMPLES = 40


@pytest.fixture(scope="module")
def fuzz_url(fleet: Fleet, ray_driver: None) -> Iterator[str]:
    model = fake_model(
        MODEL,
        engine_args={"token_delay_s": 0.001},
        limits={"default_max_tokens": 8, "max_tokens_limit": 16},
    )
    with deployed(fleet.base_url, APP, {"router": ONE_ROUTER, "models": [model]}, 120) as url:
        yield url


def test_no_generated_request_gets_a_server_error(fuzz_url: str) -> None:
    schema = schemathesis.openapi.from_url(f"{fuzz_url}/openapi.json")
    with httpx.Client(timeout=30) as http:
        seen = fuzz(schema, sender(http, fuzz_url), model=MODEL, max_examples=MAX_EXAMPLES)
    print(f"statuses per operation: {seen}")
    # The largest answer: a node's Prometheus text (past 4 MiB late in a test run, which
    # Serve's gRPC proxy channel refused before the launcher raised its limit).
    metrics = httpx.get(f"{fuzz_url}/metrics", timeout=30)
    print(f"/metrics: {metrics.status_code}, {len(metrics.content) / 2**20:.1f} MiB")
    assert metrics.status_code == 200, metrics.text[:200]
    chat = seen["POST /v1/chat/completions"]
    assert chat.get(200, 0) > 0 and chat.get(400, 0) > 0, seen  # both kinds were sent
