"""What a client sees when something is wrong: status, OpenAI error body, request id."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, Any

import openai
import pytest
from fastapi.testclient import TestClient

from llm_fleet.deployments.engine import Reply, Route
from llm_fleet.router.app import create_app
from tests.fake_handle import BACK_PRESSURE, run_sync
from tests.fakes import (
    CHAT_MODEL,
    COMPLETIONS_MODEL,
    MAX_MODEL_LEN,
    MAX_TOKENS_LIMIT,
    fleet_config,
    make_fleet,
)

if TYPE_CHECKING:
    import httpx2  # what starlette's TestClient and the openai SDK are built on

GENERATED_ID = re.compile(r"^req-[0-9a-f]{32}$")
SECRET = "secret-detail-from-the-replica"
CHAT_PATH = "/v1/chat/completions"


@pytest.fixture
def http() -> Iterator[TestClient]:
    with TestClient(make_fleet().app) as client:
        yield client


def chat(text: str = "hello there", **fields: Any) -> dict[str, Any]:
    return {"model": CHAT_MODEL, "messages": [{"role": "user", "content": text}], **fields}


def error_of(
    response: httpx2.Response, status: int, *, code: str | None = None, param: str | None = None
) -> dict[str, Any]:
    """The OpenAI error object of ``response``, after checking its shape and request id."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}, body
    error: dict[str, Any] = body["error"]
    assert set(error) == {"message", "type", "param", "code", "request_id"}, error
    assert isinstance(error["message"], str) and error["message"], error
    assert error["request_id"] == response.headers["x-request-id"], error
    if code is not None:
        assert error["code"] == code, error
    if param is not None:
        assert error["param"] == param, error
    return error


def test_unknown_model_is_404_model_not_found(http: TestClient) -> None:
    for path in (CHAT_PATH, "/v1/completions"):
        body = {**chat(), "prompt": "hi", "model": "gpt-17"}
        error = error_of(http.post(path, json=body), 404, code="model_not_found", param="model")
        assert "gpt-17" in error["message"]
        assert error["type"] == "invalid_request_error"


@pytest.mark.parametrize("raw", [b"{not json", b"", b"\xff\xfe", b'{"model": "x",}'])
def test_malformed_json_is_400_not_422(http: TestClient, raw: bytes) -> None:
    response = http.post(CHAT_PATH, content=raw, headers={"content-type": "application/json"})
    error_of(response, 400, code="invalid_json")


@pytest.mark.parametrize("raw", [b"[1, 2]", b'"a string"', b"null", b"42"])
def test_a_body_that_is_not_an_object_is_400(http: TestClient, raw: bytes) -> None:
    response = http.post(CHAT_PATH, content=raw, headers={"content-type": "application/json"})
    error = error_of(response, 400)
    assert "JSON object" in error["message"]


@pytest.mark.parametrize(
    ("path", "fields", "param"),
    [
        (CHAT_PATH, {"model": 123}, "model"),
        (CHAT_PATH, {"messages": "x"}, "messages"),
        (CHAT_PATH, {"messages": []}, "messages"),
        (CHAT_PATH, {"max_tokens": "a"}, "max_tokens"),
        (CHAT_PATH, {"max_tokens": 0}, "max_tokens"),
        (CHAT_PATH, {"max_tokens": True}, "max_tokens"),
        (CHAT_PATH, {"max_completion_tokens": 1.5}, "max_completion_tokens"),
        (CHAT_PATH, {"stream": "yes"}, "stream"),
        (CHAT_PATH, {"stream_options": {"include_usage": "yes"}}, "stream_options.include_usage"),
        ("/v1/completions", {"prompt": {"text": "x"}}, "prompt"),
        ("/v1/completions", {"max_tokens": "a"}, "max_tokens"),
    ],
)
def test_a_field_of_the_wrong_type_is_400_naming_it(
    http: TestClient, path: str, fields: dict[str, Any], param: str
) -> None:
    base = chat() if path == CHAT_PATH else {"model": COMPLETIONS_MODEL, "prompt": "hi"}
    error = error_of(http.post(path, json={**base, **fields}), 400, code="invalid_value")
    assert error["param"] == param
    assert param in error["message"]


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        (CHAT_PATH, {"model": CHAT_MODEL}, "messages"),
        ("/v1/completions", {"model": COMPLETIONS_MODEL}, "prompt"),
        (CHAT_PATH, {"messages": [{"role": "user", "content": "hi"}]}, "model"),
    ],
)
def test_a_missing_field_is_400_naming_it(
    http: TestClient, path: str, body: dict[str, Any], param: str
) -> None:
    error = error_of(http.post(path, json=body), 400, param=param)
    assert error["message"] == f"Missing required parameter: '{param}'."


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
def test_max_tokens_over_the_limit_is_400_naming_the_limit(http: TestClient, field: str) -> None:
    response = http.post(CHAT_PATH, json=chat("hi", **{field: MAX_TOKENS_LIMIT + 1}))
    error = error_of(response, 400, code="max_tokens_exceeded", param=field)
    assert f"limit of {MAX_TOKENS_LIMIT}" in error["message"]


def test_max_tokens_at_the_limit_is_served(http: TestClient) -> None:
    body = chat(max_tokens=MAX_TOKENS_LIMIT, ignore_eos=True)
    assert http.post(CHAT_PATH, json=body).json()["usage"]["completion_tokens"] == MAX_TOKENS_LIMIT


@pytest.mark.parametrize("stream", [False, True])
def test_a_prompt_over_the_context_is_400_context_length_exceeded(
    http: TestClient, stream: bool
) -> None:
    too_long = " ".join(["word"] * (MAX_MODEL_LEN + 1))
    response = http.post(CHAT_PATH, json=chat(too_long, stream=stream))
    error = error_of(response, 400, code="context_length_exceeded")
    assert f"maximum context length is {MAX_MODEL_LEN} tokens" in error["message"]


def test_the_sdk_sees_the_error_code(http: TestClient) -> None:
    sdk = openai.OpenAI(
        base_url="http://testserver/v1", api_key="k", http_client=http, max_retries=0
    )
    with pytest.raises(openai.BadRequestError) as caught:
        sdk.chat.completions.create(
            model=CHAT_MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=10_000
        )
    assert caught.value.code == "max_tokens_exceeded"


def test_a_sane_request_id_is_echoed_everywhere(http: TestClient) -> None:
    headers = {"X-Request-Id": "client-42.a_b:c"}
    answer = http.post(CHAT_PATH, json=chat(), headers=headers)
    assert answer.headers["x-request-id"] == "client-42.a_b:c"
    assert answer.json()["id"] == "chatcmpl-client-42.a_b:c"
    failed = http.post(CHAT_PATH, json=chat(max_tokens=10_000), headers=headers)
    assert error_of(failed, 400)["request_id"] == "client-42.a_b:c"
    assert http.get("/v1/models", headers=headers).headers["x-request-id"] == "client-42.a_b:c"


def test_a_request_id_is_made_when_absent(http: TestClient) -> None:
    first = http.post(CHAT_PATH, json=chat()).headers["x-request-id"]
    second = http.post(CHAT_PATH, json=chat()).headers["x-request-id"]
    assert GENERATED_ID.match(first) and GENERATED_ID.match(second)
    assert first != second


@pytest.mark.parametrize("unsafe", ["has spaces in it", "x" * 500, "tab\there", ""])
def test_an_unsafe_request_id_is_replaced(http: TestClient, unsafe: str) -> None:
    response = http.post(CHAT_PATH, json=chat(max_tokens=10_000), headers={"X-Request-Id": unsafe})
    assert GENERATED_ID.match(response.headers["x-request-id"])
    assert error_of(response, 400)["request_id"] == response.headers["x-request-id"]


def test_an_engine_failure_mid_stream_is_an_error_frame_then_done() -> None:
    fleet = make_fleet(handle_options={"death": RuntimeError(SECRET), "die_after": 3})
    with TestClient(fleet.app) as http:
        response = http.post(CHAT_PATH, json=chat("a b c d e f", stream=True))
    assert response.status_code == 200
    assert SECRET not in response.text
    frames = response.text.split("\n\n")
    assert frames[-2:] == ["data: [DONE]", ""]
    assert all(frame.startswith("data: ") for frame in frames[:-1])
    *content, failure = [json.loads(frame.removeprefix("data: ")) for frame in frames[:-2]]
    assert [c["choices"][0]["delta"]["content"] for c in content] == ["", "a", " b"]
    assert failure["error"]["code"] == "internal_error"
    assert failure["error"]["type"] == "server_error"
    assert failure["error"]["request_id"] == response.headers["x-request-id"]


def test_the_sdk_raises_on_an_error_frame() -> None:
    fleet = make_fleet(handle_options={"death": RuntimeError(SECRET), "die_after": 2})
    with TestClient(fleet.app) as http:
        sdk = openai.OpenAI(
            base_url="http://testserver/v1", api_key="k", http_client=http, max_retries=0
        )
        stream = sdk.chat.completions.create(
            model=CHAT_MODEL, messages=[{"role": "user", "content": "a b c d"}], stream=True
        )
        with pytest.raises(openai.APIError) as caught:
            list(stream)
    assert SECRET not in str(caught.value)


@pytest.mark.parametrize("at_call", [False, True], ids=["first-item", "at-call"])
@pytest.mark.parametrize("stream", [False, True])
def test_a_replica_failure_before_the_answer_is_a_500_that_hides_it(
    at_call: bool, stream: bool
) -> None:
    failure = {"refuse": RuntimeError(SECRET), "refuse_at_call": at_call}
    fleet = make_fleet(handle_options=failure)
    with TestClient(fleet.app, raise_server_exceptions=False) as http:
        response = http.post(CHAT_PATH, json=chat(stream=stream), headers={"X-Request-Id": "r-1"})
    error = error_of(response, 500, code="internal_error")
    assert SECRET not in response.text
    assert error["request_id"] == "r-1"


class _SilentClient:
    """A model client whose stream ends before its first item."""

    async def stream(
        self, route: Route, body: dict[str, Any], request_id: str
    ) -> AsyncIterator[str | Reply]:
        nothing: tuple[str | Reply, ...] = ()
        for item in nothing:
            yield item


def test_an_engine_that_answers_nothing_is_a_500() -> None:
    app = create_app(fleet_config(), {CHAT_MODEL: _SilentClient()})
    with TestClient(app) as http:
        error_of(http.post(CHAT_PATH, json=chat()), 500, code="internal_error")


def test_back_pressure_is_503_with_retry_after() -> None:
    with TestClient(make_fleet(handle_options={"refuse": BACK_PRESSURE}).app) as http:
        response = http.post(CHAT_PATH, json=chat())
    error = error_of(response, 503, code="service_unavailable")
    assert response.headers["retry-after"] == "1"
    assert "at capacity" in error["message"]


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [("GET", "/v2/nothing", 404), ("POST", "/v1/embeddings", 404), ("GET", CHAT_PATH, 405)],
)
def test_an_unknown_route_answers_in_openai_shape(
    http: TestClient, method: str, path: str, status: int
) -> None:
    error = error_of(http.request(method, path), status)
    assert error["type"] == "invalid_request_error"
    if status == 404:
        assert error["code"] == "not_found"


def test_an_oversize_body_is_413() -> None:
    with TestClient(make_fleet(max_request_bytes=1024).app) as http:
        declared = http.post(CHAT_PATH, json=chat("x" * 2000))
        chunked = http.post(CHAT_PATH, content=iter([b'{"model": "', b"x" * 2000, b'"}']))
        fits = http.post(CHAT_PATH, json=chat("x" * 500))
    error_of(declared, 413, code="request_too_large")
    error_of(chunked, 413, code="request_too_large")
    assert "content-length" not in chunked.request.headers  # counted while read, not declared
    assert fits.status_code == 200


def test_no_cors_headers_by_default(http: TestClient) -> None:
    origin = {"Origin": "https://app.example"}
    answer = http.post(CHAT_PATH, json=chat(), headers=origin)
    preflight = http.options(CHAT_PATH, headers={**origin, "Access-Control-Request-Method": "POST"})
    for response in (answer, preflight):
        assert not [h for h in response.headers if h.lower().startswith("access-control-")]


def test_cors_allows_the_configured_origin_only() -> None:
    app = make_fleet(cors_allowed_origins=["https://app.example"]).app
    with TestClient(app) as http:
        preflight = http.options(
            CHAT_PATH,
            headers={
                "Origin": "https://app.example",
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "content-type,authorization",
            },
        )
        answer = http.post(CHAT_PATH, json=chat(), headers={"Origin": "https://app.example"})
        other = http.post(CHAT_PATH, json=chat(), headers={"Origin": "https://evil.example"})
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == "https://app.example"
    assert answer.headers["access-control-allow-origin"] == "https://app.example"
    assert "x-request-id" in answer.headers["access-control-expose-headers"].lower()
    assert "access-control-allow-origin" not in other.headers


# --- an engine that died, its replica process alive ----------------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_a_dead_engine_is_a_503_and_fails_the_replicas_health_check(stream: bool) -> None:
    """vLLM's engine core gone, the replica alive: the replica answers 503
    ``engine_dead`` with Retry-After (never 500) and fails its health check, so Serve
    replaces it."""
    fleet = make_fleet()
    fleet.engines[CHAT_MODEL].die()
    with TestClient(fleet.app) as http:
        first = http.post(CHAT_PATH, json=chat(stream=stream))
        again = http.post(CHAT_PATH, json=chat(stream=stream))
    for response in (first, again):
        error = error_of(response, 503, code="engine_dead")
        assert "engine stopped" in error["message"]
        assert response.headers["retry-after"] == "1"
    replica = fleet.handles[CHAT_MODEL].replica
    with pytest.raises(RuntimeError, match="engine dead"):
        run_sync(replica.check_health())
    healthy = make_fleet().handles[CHAT_MODEL].replica
    run_sync(healthy.check_health())  # the check fails for the dead one only
