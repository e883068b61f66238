"""schemathesis against the live gateway's ``/openapi.json``: no generated request, valid
or not, gets a server error, and every refusal is an OpenAI error body with a request id.

The app is llm-fleet's real stack (Serve proxy, router replica, model replica) over the
fake engine (``tests/serve/fake_apps.py``), so a request the router lets through costs
milliseconds: its model allows 16 output tokens, and a body naming a model gets the
served one half the time (``tests/schema_fuzz.py``; the rest exercise the unknown-model
path). Bounded: ``MAX_EXAMPLES`` generated requests per operation.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis

from tests.schema_fuzz import fuzz
from tests.serve.conftest import Fleet

pytestmark = [pytest.mark.serve, pytest.mark.slow]

APP = "fuzz"
MODEL = "fuzz-model"
MAX_EXAMPLES = 40


@pytest.fixture(scope="module")
def fuzz_url(fleet: Fleet, ray_driver: None) -> Iterator[str]:
    from ray import serve

    from tests.serve.fake_apps import build_fake_fleet

    args = {
        "router": {"num_cpus": 0.05, "autoscaling": {"min_replicas": 1, "max_replicas": 1}},
        "models": [
            {
                "id": MODEL,
                "source": "embedded://smollm2-135m-instruct",
                "engine_args": {"token_delay_s": 0.001},
                "limits": {"default_max_tokens": 8, "max_tokens_limit": 16},
                "resources": {"num_cpus": 0.05},
                "autoscaling": {"min_replicas": 1, "max_replicas": 1},
                "graceful_shutdown_timeout_s": 1,
            }
        ],
    }
    serve.run(build_fake_fleet(args), name=APP, route_prefix=f"/{APP}")
    url = f"{fleet.base_url}/{APP}"
    try:
        deadline = time.monotonic() + 120
        while httpx.get(f"{url}/health/ready", timeout=10).status_code != 200:
            assert time.monotonic() < deadline, f"{MODEL} did not start"
            time.sleep(0.5)
        yield url
    finally:
        serve.delete(APP)


def test_no_generated_request_gets_a_server_error(fuzz_url: str) -> None:
    schema = schemathesis.openapi.from_url(f"{fuzz_url}/openapi.json")
    with httpx.Client(timeout=30) as http:

        def send(case: schemathesis.Case) -> tuple[int, Any, Any]:
            kwargs = case.as_transport_kwargs(base_url=fuzz_url)
            kwargs.pop("cookies", None)  # none in this API
            response = http.request(**kwargs)
            try:
                body = response.json()
            except ValueError:
                body = response.text
            return response.status_code, response.headers, body

        seen = fuzz(schema, send, model=MODEL, max_examples=MAX_EXAMPLES)
    print(f"statuses per operation: {seen}")
    chat = seen["POST /v1/chat/completions"]
    assert chat.get(200, 0) > 0 and chat.get(400, 0) > 0, seen  # both kinds were sent
