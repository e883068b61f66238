"""schemathesis against the live gateway's ``/openapi.json``: no generated request, valid
or not, gets a server error, and every refusal is an OpenAI error body with a request id.

The app is llm-fleet's real stack (Serve proxy, router replica, model replica) over the
fake engine (``tests/serve/fake_apps.py``), so a request the router lets through costs
milliseconds: its model allows 16 output tokens, and a body naming a model gets the
served one half the time (``map_body`` below; the rest exercise the unknown-model path).
Bounded: ``MAX_EXAMPLES`` per operation and phase.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error

from tests.serve.conftest import Fleet

pytestmark = [pytest.mark.serve, pytest.mark.slow]

APP = "fuzz"
MODEL = "fuzz-model"
MAX_EXAMPLES = 25


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


@pytest.fixture(scope="module")
def fuzz_schema(fuzz_url: str) -> Any:
    return schemathesis.openapi.from_url(f"{fuzz_url}/openapi.json")


schema = schemathesis.pytest.from_fixture("fuzz_schema")


@schemathesis.hook
def map_body(context: schemathesis.HookContext, body: Any) -> Any:
    """Half the bodies that name a model name the served one (chosen by a hash of what
    was generated, so a failing example replays)."""
    named = isinstance(body, dict) and isinstance(body.get("model"), str)
    if named and hashlib.sha256(body["model"].encode()).digest()[0] % 2 == 0:
        return {**body, "model": MODEL}
    return body


def openai_error_shape(
    ctx: schemathesis.CheckContext, response: schemathesis.Response, case: schemathesis.Case
) -> bool | None:
    """Every 4xx is an OpenAI error body carrying the request id of its header."""
    if response.status_code < 400:
        return None
    assert response.headers.get("content-type", [""])[0].startswith("application/json")
    error = response.json()["error"]
    assert error["message"] and error["type"] and error["code"], error
    assert [error["request_id"]] == response.headers["x-request-id"], error
    return True


@schema.parametrize()
@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,
)
def test_no_generated_request_gets_a_server_error(case: schemathesis.Case, fuzz_url: str) -> None:
    case.call_and_validate(
        base_url=fuzz_url, checks=[not_a_server_error, openai_error_shape], timeout=30
    )
