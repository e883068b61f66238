"""/health/live, /health/ready and the readiness gate, over the fake engine."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from fastapi.testclient import TestClient

from llm_fleet.router.model_status import State
from tests.fakes import (
    CHAT_MODEL,
    COMPLETIONS_MODEL,
    FakeStatusSource,
    RecordingMetrics,
    make_fleet,
)

if TYPE_CHECKING:
    pass  # what starlette's TestClient is built on

from tests.unit.ops_helpers import (
    CHAT_PATH,
    COMPLETIONS_PATH,
    chat,
    openai_error,
    queue_policy,
)

# --- /health/live and /health/ready --------------------------------------------------


def test_ready_is_503_while_a_required_model_loads() -> None:
    status = FakeStatusSource()
    status.set(CHAT_MODEL, "ready")
    status.set(COMPLETIONS_MODEL, "downloading")
    with TestClient(make_fleet(status=status).app) as http:
        response = http.get("/health/ready")
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "not_ready"
    assert set(body["models"]) == {CHAT_MODEL, COMPLETIONS_MODEL}  # allowed models only
    assert body["models"][CHAT_MODEL]["state"] == "ready"
    loading = body["models"][COMPLETIONS_MODEL]
    assert loading["state"] == "downloading"
    assert loading["required_for_readiness"] is True
    assert loading["replicas"] == {"running": 0, "starting": 1, "min": 1, "max": 2}


def test_ready_is_200_when_required_models_run_even_if_a_scaled_to_zero_one_is_idle() -> None:
    status = FakeStatusSource()
    status.set(CHAT_MODEL, "ready")
    status.set(COMPLETIONS_MODEL, "idle", reason="scaled to zero", min_replicas=0)
    scaled_to_zero = {COMPLETIONS_MODEL: {"autoscaling": {"min_replicas": 0}}}
    with TestClient(make_fleet(status=status, model_fields=scaled_to_zero).app) as http:
        response = http.get("/health/ready")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ready"
    idle = body["models"][COMPLETIONS_MODEL]
    assert (idle["state"], idle["reason"], idle["required_for_readiness"]) == (
        "idle",
        "scaled to zero",
        False,
    )


def test_a_failed_models_reason_shows_in_the_readiness_body() -> None:
    status = FakeStatusSource()
    status.set(CHAT_MODEL, "failed", reason="CUDA out of memory")
    status.set(COMPLETIONS_MODEL, "ready")
    with TestClient(make_fleet(status=status).app) as http:
        ready = http.get("/health/ready")
        live = http.get("/health/live")
    assert ready.status_code == 503
    failed = ready.json()["models"][CHAT_MODEL]
    assert (failed["state"], failed["reason"]) == ("failed", "CUDA out of memory")
    assert live.status_code == 200
    assert live.json()["models"][CHAT_MODEL]["reason"] == "CUDA out of memory"


@pytest.mark.parametrize("source", ["always-ready", "empty"])
def test_before_any_status_read_nothing_is_ready(source: str) -> None:
    # Without a source the app uses AlwaysReady; the board's is empty until its first poll.
    status = FakeStatusSource() if source == "empty" else None
    with TestClient(make_fleet(status=status).app) as http:
        ready = http.get("/health/ready")
        live = http.get("/health/live")
    assert ready.status_code == 503
    assert ready.json()["status"] == "not_ready"
    for body in (ready.json(), live.json()):
        assert {m: s["state"] for m, s in body["models"].items()} == {
            CHAT_MODEL: "unknown",
            COMPLETIONS_MODEL: "unknown",
        }
        assert body["models"][CHAT_MODEL]["required_for_readiness"] is True


def test_an_unknown_models_entry_has_the_documented_keys() -> None:
    with TestClient(make_fleet().app) as http:
        entry = http.get("/health/ready").json()["models"][CHAT_MODEL]
    assert set(entry) == {
        "state",
        "reason",
        "required_for_readiness",
        "replicas",
        "loading_for_s",
        "placement",
    }


@pytest.mark.parametrize("state", ["ready", "loading", "failed", "idle"])
def test_live_is_200_whatever_the_models_do(state: State) -> None:
    status = FakeStatusSource()
    status.set(CHAT_MODEL, state)
    with TestClient(make_fleet(status=status).app) as http:
        response = http.get("/health/live")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "live"
    assert body["models"][CHAT_MODEL]["state"] == state
    assert body["models"][COMPLETIONS_MODEL]["state"] == "unknown"


# --- gating requests on model readiness ------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("state", ["loading", "downloading"])
def test_a_loading_model_is_503_at_once_with_its_retry_after(state: State, stream: bool) -> None:
    status, metrics = FakeStatusSource(), RecordingMetrics()
    status.set(CHAT_MODEL, state)
    policy = {CHAT_MODEL: {"unavailable": {"retry_after_s": 42}}}
    fleet = make_fleet(status=status, metrics=metrics, model_fields=policy)
    with TestClient(fleet.app) as http:
        started = time.monotonic()
        response = http.post(CHAT_PATH, json=chat(stream=stream))
        elapsed = time.monotonic() - started
    error = openai_error(response, 503, "model_not_ready")
    assert elapsed < 0.5
    assert response.headers["retry-after"] == "42"
    assert response.headers["content-type"] == "application/json"
    assert (error["type"], error["param"]) == ("service_unavailable", "model")
    assert error["message"] == f"Model '{CHAT_MODEL}' is {state}; retry in 42 s."
    assert metrics.dispatched == []  # no engine saw it


def test_other_models_are_served_while_one_loads() -> None:
    status = FakeStatusSource()
    status.set(CHAT_MODEL, "ready")
    status.set(COMPLETIONS_MODEL, "loading")
    with TestClient(make_fleet(status=status).app) as http:
        answer = http.post(CHAT_PATH, json=chat())
        refused = http.post(COMPLETIONS_PATH, json={"model": COMPLETIONS_MODEL, "prompt": "hi"})
    assert answer.status_code == 200
    assert answer.json()["choices"][0]["message"]["content"] == "alpha beta gamma"
    openai_error(refused, 503, "model_not_ready")
    assert refused.headers["retry-after"] == "15"  # the policy's default


def test_an_idle_model_is_woken_and_answered_503() -> None:
    status = FakeStatusSource()
    status.set(CHAT_MODEL, "idle", reason="scaled to zero", min_replicas=0)
    with TestClient(make_fleet(status=status).app) as http:
        response = http.post(CHAT_PATH, json=chat())
    error = openai_error(response, 503, "model_not_ready")
    assert "scaled to zero and starting" in error["message"]
    assert status.woken == [CHAT_MODEL]


@pytest.mark.parametrize("action", ["reject", "queue"])
def test_a_failed_model_is_503_at_once_and_not_woken(action: str) -> None:
    status = FakeStatusSource()
    status.set(CHAT_MODEL, "failed", reason="CUDA out of memory")
    policy = {CHAT_MODEL: {"unavailable": {"action": action, "retry_after_s": 7}}}
    with TestClient(make_fleet(status=status, model_fields=policy).app) as http:
        started = time.monotonic()
        response = http.post(CHAT_PATH, json=chat())
        elapsed = time.monotonic() - started
    error = openai_error(response, 503, "model_not_ready")
    assert elapsed < 0.5
    assert response.headers["retry-after"] == "7"
    assert "failed to start" in error["message"]
    assert "CUDA" not in error["message"]  # the reason is for operators (/health/ready)
    assert status.woken == []
    assert status.waited == []


@pytest.mark.parametrize("initial", ["loading", "idle"])
def test_a_queued_request_waits_and_is_served_when_the_model_is_ready(initial: State) -> None:
    status = FakeStatusSource()
    status.set(CHAT_MODEL, initial)
    status.ready_after_s[CHAT_MODEL] = 0.3
    policy = {CHAT_MODEL: queue_policy(queue_timeout_s=5.0)}
    with TestClient(make_fleet(status=status, model_fields=policy).app) as http:
        started = time.monotonic()
        response = http.post(CHAT_PATH, json=chat("wait for me"))
        elapsed = time.monotonic() - started
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == "wait for me"
    assert 0.3 <= elapsed < 3.0
    assert status.woken == [CHAT_MODEL]
    assert status.waited == [(CHAT_MODEL, 5.0)]


def test_a_queued_request_gets_503_when_the_queue_timeout_passes() -> None:
    status = FakeStatusSource()
    status.set(CHAT_MODEL, "loading")
    policy = {CHAT_MODEL: queue_policy(retry_after_s=9, queue_timeout_s=0.3)}
    with TestClient(make_fleet(status=status, model_fields=policy).app) as http:
        started = time.monotonic()
        response = http.post(CHAT_PATH, json=chat())
        elapsed = time.monotonic() - started
    openai_error(response, 503, "model_not_ready")
    assert response.headers["retry-after"] == "9"
    assert 0.3 <= elapsed < 3.0
    assert status.waited == [(CHAT_MODEL, 0.3)]


def test_models_show_their_status_when_the_source_knows_it() -> None:
    status = FakeStatusSource()
    status.set(CHAT_MODEL, "downloading")
    with TestClient(make_fleet(status=status).app) as http:
        listed = {card["id"]: card for card in http.get("/v1/models").json()["data"]}
        one = http.get(f"/v1/models/{CHAT_MODEL}").json()
        status.set(COMPLETIONS_MODEL, "ready")
        other = http.get(f"/v1/models/{COMPLETIONS_MODEL}").json()
    assert listed[CHAT_MODEL]["status"] == "downloading"
    assert "status" not in listed[COMPLETIONS_MODEL]  # not read yet
    assert one["status"] == "downloading"
    assert other["status"] == "ready"


# --- a model lost while a request waits for its answer ---------------------------------


async def _lost_while_waiting(
    fleet: Any, status: FakeStatusSource, lost_after_s: float, body: dict[str, Any]
) -> tuple[httpx.Response, float, int]:
    """Send ``body``; after ``lost_after_s`` the model's status becomes loading (its
    last replica died and Serve starts another). The answer, how long it took, and
    the requests still generating right after."""
    transport = httpx.ASGITransport(app=fleet.app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
        sent = time.monotonic()
        answer = asyncio.create_task(http.post(CHAT_PATH, json=body))
        await asyncio.sleep(lost_after_s)
        status.set(CHAT_MODEL, "loading")
        response = await answer
        took = time.monotonic() - sent
    return response, took, await fleet.unfinished()


@pytest.mark.parametrize("stream", [False, True])
def test_a_request_waiting_when_its_model_goes_down_is_503_at_once(stream: bool) -> None:
    """Serve's handle would hold it until a replacement replica runs (a minute for a
    real engine): the router answers the 503 any request gets while the model is down,
    and takes the request out of the queue."""
    status = FakeStatusSource()
    status.set(CHAT_MODEL, "ready")
    policy = {CHAT_MODEL: {"unavailable": {"retry_after_s": 11}}}
    # Serve's handle queue holds the call (for a replica that never comes, in time).
    fleet = make_fleet(status=status, model_fields=policy, handle_options={"queued_s": 10})
    body = chat(max_tokens=20, stream=stream)
    response, took, _ = asyncio.run(_lost_while_waiting(fleet, status, 0.2, body))
    error = openai_error(response, 503, "model_not_ready")
    assert response.headers["retry-after"] == "11"
    assert "is loading" in error["message"]
    assert took < 1.5
    [call] = fleet.handles[CHAT_MODEL].responses
    assert call.left_queue  # the request left the model's queue


def test_in_queue_mode_a_request_waits_for_the_model_to_come_back() -> None:
    status = FakeStatusSource()
    status.set(CHAT_MODEL, "ready")
    status.ready_after_s[CHAT_MODEL] = 0.3
    policy = {CHAT_MODEL: queue_policy(queue_timeout_s=5.0)}
    fleet = make_fleet(status=status, model_fields=policy, token_delay_s=0.1)
    body = chat(max_tokens=10, ignore_eos=True)  # 1 s
    response, took, _ = asyncio.run(_lost_while_waiting(fleet, status, 0.2, body))
    assert response.status_code == 200, response.text
    assert status.waited == [(CHAT_MODEL, 5.0)]
    assert took < 3.0


def test_a_stream_already_relaying_is_not_cut_by_the_status() -> None:
    """Only the wait for the first item is watched: a stream that is relaying ends by
    itself (an error frame if its replica dies)."""
    status = FakeStatusSource()
    status.set(CHAT_MODEL, "ready")
    fleet = make_fleet(status=status, token_delay_s=0.05)
    body = chat(max_tokens=20, ignore_eos=True, stream=True)  # 1 s
    response, _, _ = asyncio.run(_lost_while_waiting(fleet, status, 0.3, body))
    assert response.status_code == 200
    assert response.text.rstrip().endswith("data: [DONE]")
    assert '"error"' not in response.text


def test_a_router_serving_no_model_yet_is_not_ready() -> None:
    """A router app whose models are apps of their own, none found yet."""
    from llm_fleet.router.health import is_ready

    assert is_ready({}, {}) is False
