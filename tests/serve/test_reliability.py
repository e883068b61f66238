"""Hostile input, overload, disconnect storms and replica death on real Ray Serve: every
request is answered, in the OpenAI shape, none hangs and nothing leaks (issue 12's
numbered failures, each as it was found: n=1000, Serve's plain-text 503, a request
hanging while its model restarted, the in-flight gauge leaking on disconnects, a 64 KiB
header, role "banana", a text/plain body).

The app is llm-fleet's real stack (Serve proxy, router replica, model replica) over the
fake engine (``tests/serve/fake_apps.py``): its tokens take 50 ms, so requests last, and
its start takes ``START_DELAY_S``, so a killed model replica leaves the model with no
live replica for that long, as a real engine's loading does. The model takes
``MAX_ONGOING`` requests at once and queues ``MAX_QUEUED`` more.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.serve.conftest import Fleet
from tests.serve.fake_apps import ONE_ROUTER, deployed, fake_model, wait_ready

pytestmark = [pytest.mark.serve, pytest.mark.slow]

APP = "reliability"
MODEL = "slow-model"
# Room for a storm of streams (one replica takes 64), and no start delay.
ROOMY_MODEL = "roomy-model"
# The same small queue behind its own door (/m/<id>/v1, the replica is the ingress).
DIRECT_MODEL = "direct-model"
MAX_ONGOING = 2
MAX_QUEUED = 4
START_DELAY_S = 20.0
TOKEN_DELAY_S = 0.05
# Serve notices a dead replica at its next health check; a request sent before that
# waits for it (then gets the 503), so that is the bound on any answer's wait.
HEALTH_CHECK_S = 2.0


@pytest.fixture(scope="module")
def app_url(fleet: Fleet, ray_driver: None) -> Iterator[str]:
    slow = fake_model(
        MODEL,
        engine_args={"token_delay_s": TOKEN_DELAY_S, "start_delay_s": START_DELAY_S},
        max_ongoing_requests=MAX_ONGOING,
        max_queued_requests=MAX_QUEUED,
        health_check_period_s=HEALTH_CHECK_S,
        unavailable={"retry_after_s": 7},
    )
    roomy = fake_model(ROOMY_MODEL, engine_args={"token_delay_s": TOKEN_DELAY_S})
    direct = fake_model(
        DIRECT_MODEL,
        engine_args={"token_delay_s": TOKEN_DELAY_S},
        max_ongoing_requests=MAX_ONGOING,
        max_queued_requests=MAX_QUEUED,
        direct=True,
    )
    args = {"router": ONE_ROUTER, "models": [slow, roomy, direct]}
    with deployed(fleet.base_url, APP, args, START_DELAY_S + 60) as url:
        yield url


def _body(max_tokens: int, *, stream: bool, model: str = MODEL) -> dict[str, Any]:
    """A request that generates ``max_tokens`` (the fake engine would otherwise stop
    after echoing the prompt's five words)."""
    return {
        "model": model,
        "messages": [{"role": "user", "content": "one two three four five"}],
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "stream": stream,
    }


def _assert_openai_rejection(response: httpx.Response, statuses: tuple[int, ...]) -> None:
    """An OpenAI error body with the request id, and Retry-After."""
    assert response.status_code in statuses, (response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/json"), response.text
    error = response.json()["error"]
    assert error["request_id"] == response.headers["x-request-id"]
    assert error["message"] and error["type"] and error["code"]
    assert int(response.headers["retry-after"]) >= 1


async def _ask(client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> httpx.Response:
    """One request, the whole answer read (a stream to its end)."""
    response = await client.post(f"{url}/v1/chat/completions", json=body)
    await response.aread()
    return response


def _storm(url: str, model: str, size: int = 120) -> dict[int, int]:
    """``size`` requests at once (half streamed) to ``model`` at ``url``: every answer a
    whole 200 or an OpenAI-shaped 503 with Retry-After. Counts by status."""

    async def storm() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=size + 10)
        async with httpx.AsyncClient(timeout=60, limits=limits) as client:
            bodies = [_body(20, stream=i % 2 == 0, model=model) for i in range(size)]
            return await asyncio.gather(*(_ask(client, url, b) for b in bodies))

    by_status: dict[int, int] = {}
    for response in asyncio.run(storm()):
        by_status[response.status_code] = by_status.get(response.status_code, 0) + 1
        if response.status_code == 200:
            assert response.text.strip(), "an empty 200"
            if response.headers["content-type"].startswith("text/event-stream"):
                assert response.text.rstrip().endswith("data: [DONE]")
        else:
            _assert_openai_rejection(response, (429, 503))
    print(f"{size} at once to {url}, {MAX_ONGOING} ongoing + {MAX_QUEUED} queued: {by_status}")
    assert by_status.get(200, 0) >= MAX_ONGOING, by_status
    assert by_status.get(503, 0) > 0, by_status
    # And nothing is left over: the next request is served.
    after = httpx.post(f"{url}/v1/chat/completions", json=_body(2, stream=False, model=model))
    assert after.is_success, after.text
    return by_status


def test_overload_answers_200_or_an_openai_503_with_retry_after(app_url: str) -> None:
    """120 requests at once to a model that takes 2 and queues 4: the rest are refused
    at once, each refusal an OpenAI-shaped 503 with Retry-After; nothing else. The
    router's request counter files each answer under the status the client got (Serve's
    own refusals used to be counted as 500s)."""
    requests = "llm_fleet_requests_total"
    before = {s: _metric(app_url, requests, MODEL, status=s) for s in ("200", "503", "500")}
    by_status = _storm(app_url, MODEL)
    wanted = {"200": by_status.get(200, 0) + 1, "503": by_status[503], "500": 0}  # +1: `after`
    deadline = time.monotonic() + 30  # Ray's metrics agent exports every few seconds
    while True:
        counted = {s: _metric(app_url, requests, MODEL, status=s) - before[s] for s in wanted}
        if counted == wanted or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert counted == wanted, f"counted {counted}, answered {wanted}"


def test_overload_on_a_direct_door_is_openai_shaped_too(app_url: str) -> None:
    """The same storm at a direct model's own door, where Serve's proxy is the caller
    and used to answer the surplus with its plain-text 503: the replica's own bound
    (run 2, queue 4) now refuses it first, in the router's shape."""
    by_status = _storm(f"{app_url}/m/{DIRECT_MODEL}", DIRECT_MODEL)
    # The replica's bound, not Serve's queue: at most 2 run + 4 wait among the first
    # wave, so most of the 120 are refused (the rest arrive as slots free).
    assert by_status[503] >= 60, by_status


def _model_replica() -> str:
    from ray.util.state import list_actors

    alive = list_actors(
        filters=[("class_name", "=", f"ServeReplica:{APP}:{MODEL}"), ("state", "=", "ALIVE")]
    )
    assert len(alive) == 1, alive
    return str(alive[0].name)


def test_requests_while_the_model_replica_restarts_are_answered_at_once(app_url: str) -> None:
    """The model replica is killed mid-stream: the stream ends with an error frame, and
    each request sent while the replacement starts (``START_DELAY_S``) gets an
    OpenAI-shaped 503 with Retry-After (reject mode) within Serve's health check period
    and the status board's poll: none waits for the restart."""
    import ray

    url = f"{app_url}/v1/chat/completions"
    with httpx.Client(timeout=30) as client:
        with client.stream("POST", url, json=_body(400, stream=True)) as stream:
            lines = stream.iter_lines()
            assert next(lines).startswith("data: ")
            ray.kill(ray.get_actor(_model_replica(), namespace="serve"), no_restart=True)
            killed = time.monotonic()
            rest = "\n".join(lines)
        ended_after = time.monotonic() - killed
        assert '"error"' in rest and rest.rstrip().endswith("data: [DONE]"), rest[-500:]
        assert ended_after < 10, ended_after
        answered: list[tuple[float, int]] = []
        for _ in range(10):
            sent = time.monotonic()
            response = client.post(url, json=_body(4, stream=False))
            took = time.monotonic() - sent
            answered.append((round(took, 2), response.status_code))
            if response.status_code != 200:
                _assert_openai_rejection(response, (503,))
            time.sleep(0.5)
    print(f"stream ended {ended_after:.1f} s after the kill; then (s, status): {answered}")
    # Far below START_DELAY_S: none waited for the restart (measured: 1.8 to 3.1 s for the
    # first one, the health check and the board's poll; hundredths after that).
    assert all(took < HEALTH_CHECK_S + 5 for took, _ in answered), answered
    assert any(status == 503 for _, status in answered), answered
    wait_ready(app_url, START_DELAY_S + 60)
    assert httpx.post(url, json=_body(2, stream=False), timeout=30).is_success


# --- hostile input, through Serve's proxy -------------------------------------------------


@pytest.mark.parametrize(
    ("change", "status", "code"),
    [
        ({"n": 1000, "stream": True}, 400, "request_limit_exceeded"),
        ({"best_of": 1000}, 400, "request_limit_exceeded"),
        ({"messages": [{"role": "banana", "content": "hi"}]}, 400, "invalid_value"),
    ],
    ids=["n", "best_of", "role"],
)
def test_requests_that_used_to_be_accepted_are_refused(
    app_url: str, change: dict[str, Any], status: int, code: str
) -> None:
    body = {**_body(4, stream=False, model=ROOMY_MODEL), **change}
    response = httpx.post(f"{app_url}/v1/chat/completions", json=body, timeout=30)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and error["request_id"] == response.headers["x-request-id"]


def test_a_64_kib_header_is_431_and_a_text_body_415(app_url: str) -> None:
    url = f"{app_url}/v1/chat/completions"
    body = _body(4, stream=False, model=ROOMY_MODEL)
    big = httpx.post(url, json=body, headers={"X-Padding": "p" * 65536}, timeout=30)
    assert big.status_code == 431, big.text
    assert big.json()["error"]["code"] == "request_header_fields_too_large"
    text = httpx.post(
        url, content=json.dumps(body), headers={"Content-Type": "text/plain"}, timeout=30
    )
    assert text.status_code == 415, text.text
    assert text.json()["error"]["code"] == "unsupported_media_type"


# --- a disconnect storm leaves nothing in flight --------------------------------------------


def _metric(url: str, name: str, model: str, status: str | None = None) -> float:
    """The sum over router replicas (and endpoints) of ``name`` for ``model`` (and
    ``status``) on the gateway's /metrics."""
    text = httpx.get(f"{url}/metrics", timeout=30).text
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(f"ray_{name}{{") or f'model="{model}"' not in line:
            continue
        if status is None or f'status="{status}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_a_disconnect_storm_leaves_no_request_in_flight(app_url: str) -> None:
    """40 streams, each cancelled by its client at 0.5 s: the router's in-flight gauge
    goes back to 0, the disconnect counter counts 40, and the engine is idle."""
    from ray import serve

    disconnects = "llm_fleet_client_disconnects_total"
    before = _metric(app_url, disconnects, ROOMY_MODEL)

    async def storm() -> None:
        async def leave_after_a_while(client: httpx.AsyncClient) -> None:
            body = _body(400, stream=True, model=ROOMY_MODEL)  # 20 s if left to run
            async with client.stream("POST", f"{app_url}/v1/chat/completions", json=body) as r:
                assert r.status_code == 200
                await asyncio.sleep(0.5)

        limits = httpx.Limits(max_connections=50)
        async with httpx.AsyncClient(timeout=30, limits=limits) as client:
            await asyncio.gather(*(leave_after_a_while(client) for _ in range(40)))

    asyncio.run(storm())
    model = serve.get_deployment_handle(ROOMY_MODEL, app_name=APP)
    deadline = time.monotonic() + 30
    seen: tuple[float, float, int] = (-1.0, -1.0, -1)
    while time.monotonic() < deadline:
        seen = (
            _metric(app_url, "llm_fleet_requests_in_flight", ROOMY_MODEL),
            _metric(app_url, disconnects, ROOMY_MODEL) - before,
            model.num_unfinished_requests.remote().result(),
        )
        if seen == (0.0, 40.0, 0):
            break
        time.sleep(1)
    assert seen == (0.0, 40.0, 0), f"(in flight, disconnects counted, engine unfinished): {seen}"


# --- the request timeout ----------------------------------------------------------------------

TIMEOUT_APP = "reliability-timeout"
TIMEOUT_S = 2.0


def test_past_the_request_timeout_a_request_is_504_and_its_generation_stops(
    fleet: Fleet, ray_driver: None
) -> None:
    """``router.request_timeout_s: 2``: a whole answer that would take 10 s is a 504
    ``request_timeout`` after 2 s, a stream that would take 10 s ends after 2 s with
    that error frame and ``[DONE]``, and the engine runs nothing afterwards (the
    generation was aborted, as a client's leaving aborts it in vLLM:
    ``test_api.py``'s disconnect tests)."""
    from ray import serve

    router = {**ONE_ROUTER, "request_timeout_s": TIMEOUT_S}
    model = fake_model("t", engine_args={"token_delay_s": TOKEN_DELAY_S})
    args = {"router": router, "models": [model]}
    with deployed(fleet.base_url, TIMEOUT_APP, args, 120) as url:
        started = time.monotonic()
        whole = httpx.post(
            f"{url}/v1/chat/completions", json=_body(200, stream=False, model="t"), timeout=30
        )
        took = time.monotonic() - started
        assert whole.status_code == 504, whole.text
        error = whole.json()["error"]
        assert (error["type"], error["code"]) == ("timeout_error", "request_timeout"), error
        assert error["request_id"] == whole.headers["x-request-id"]
        assert TIMEOUT_S <= took < TIMEOUT_S + 3, took

        started = time.monotonic()
        stream = httpx.post(
            f"{url}/v1/chat/completions", json=_body(200, stream=True, model="t"), timeout=30
        )
        took = time.monotonic() - started
        assert stream.status_code == 200
        frames = [f for f in stream.text.split("\n\n") if f.strip()]
        assert frames[-1] == "data: [DONE]", frames[-3:]
        assert json.loads(frames[-2].removeprefix("data: "))["error"]["code"] == "request_timeout"
        assert len(frames) < 200, "cut short, not served whole"
        assert TIMEOUT_S <= took < TIMEOUT_S + 3, took

        engine = serve.get_deployment_handle("t", app_name=TIMEOUT_APP)
        deadline = time.monotonic() + 10
        while (running := engine.num_unfinished_requests.remote().result()) != 0:
            assert time.monotonic() < deadline, f"{running} generations still running"
            time.sleep(0.2)


def test_the_gateway_cap_holds_across_two_router_replicas(fleet: Fleet, ray_driver: None) -> None:
    """``LLM_MAX_CONCURRENT_REQUESTS`` (``router.max_concurrent_requests``) is one count
    for the whole gateway: with two router replicas and a cap of 3, eight long streams
    sent at once through Serve's proxy get exactly three 200s and five 429
    ``gateway_busy`` with Retry-After; counted per replica, up to six would run. The
    slots come back when the streams end."""
    cap, sent = 3, 8
    routers = {"num_cpus": 0.05, "autoscaling": {"min_replicas": 2, "max_replicas": 2}}
    args = {
        "router": {**routers, "max_concurrent_requests": cap},
        "models": [fake_model(ROOMY_MODEL, engine_args={"token_delay_s": TOKEN_DELAY_S})],
    }

    async def at_once(url: str) -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=60) as client:
            bodies = [_body(40, stream=True, model=ROOMY_MODEL) for _ in range(sent)]
            return await asyncio.gather(*(_ask(client, url, b) for b in bodies))

    with deployed(fleet.base_url, "gateway-cap", args, 120) as url:
        answers = asyncio.run(at_once(url))
        served = [a for a in answers if a.status_code == 200]
        refused = [a for a in answers if a.status_code != 200]
        print(f"cap {cap}, {sent} at once: {len(served)} served, {len(refused)} refused")
        assert len(served) == cap, [a.status_code for a in answers]
        assert all(a.text.rstrip().endswith("data: [DONE]") for a in served)
        for answer in refused:
            _assert_openai_rejection(answer, (429,))
            assert answer.json()["error"]["code"] == "gateway_busy"
        again = asyncio.run(at_once(url))
        assert sum(a.status_code == 200 for a in again) == cap
