"""An engine that dies inside a live model replica, on the real stack and real vLLM.

vLLM's engine core is a child process of the model replica: killed, the replica's
process lives on, its ``AsyncLLM`` raises ``EngineDeadError``, and nothing would restart
it. The replica answers 503 ``engine_dead`` (never a 500, never a hang) and fails its
health check, Serve replaces it, and the model serves again.

The model is the fleet's S3 copy of SmolLM2 (scaled to zero when idle: the test wakes it
and leaves it serving).
"""

from __future__ import annotations

import time
from typing import Any

import httpx
import psutil
import pytest

from tests.serve.conftest import APP, S3_MODEL, Fleet

pytestmark = [pytest.mark.serve, pytest.mark.slow]

BODY = {
    "model": S3_MODEL,
    "messages": [{"role": "user", "content": "What is the capital of France?"}],
    "max_tokens": 8,
    "temperature": 0,
}
# Waking from zero or replacing the replica loads the engine again (about a minute here).
LOAD_TIMEOUT_S = 300


def _replica_pid() -> int:
    from ray.util.state import list_actors

    alive = list_actors(
        filters=[("class_name", "=", f"ServeReplica:{APP}:{S3_MODEL}"), ("state", "=", "ALIVE")]
    )
    assert len(alive) == 1, alive
    return int(alive[0].pid)


def _engine_core(replica_pid: int) -> psutil.Process:
    cores = [
        child
        for child in psutil.Process(replica_pid).children(recursive=True)
        if "EngineCore" in " ".join(child.cmdline())
    ]
    assert len(cores) == 1, cores
    return cores[0]


def _ask(url: str) -> tuple[httpx.Response, float]:
    sent = time.monotonic()
    response = httpx.post(url, json=BODY, timeout=60)  # a hang fails here
    return response, time.monotonic() - sent


def _code(response: httpx.Response) -> str | None:
    return None if response.is_success else str(response.json()["error"]["code"])


def test_a_dead_engine_in_a_live_replica_is_503_until_serve_replaces_it(
    fleet: Fleet, ray_driver: None
) -> None:
    url = f"{fleet.base_url}/v1/chat/completions"
    deadline = time.monotonic() + LOAD_TIMEOUT_S
    while not (answer := _ask(url)[0]).is_success:  # wake it
        assert answer.status_code == 503 and time.monotonic() < deadline, answer.text
        time.sleep(1)
    replica = _replica_pid()
    core = _engine_core(replica)
    core.kill()
    core.wait(10)

    seen: list[tuple[int, str | None, float]] = []
    replica_lived_on = False
    deadline = time.monotonic() + LOAD_TIMEOUT_S
    while time.monotonic() < deadline:
        response, took = _ask(url)
        seen.append((response.status_code, _code(response), round(took, 1)))
        if response.is_success:
            break
        assert response.status_code == 503, (response.status_code, response.text)
        error: dict[str, Any] = response.json()["error"]
        assert error["request_id"] == response.headers["x-request-id"]
        assert int(response.headers["retry-after"]) >= 1
        if error["code"] == "engine_dead":
            replica_lived_on = replica_lived_on or psutil.pid_exists(replica)
        time.sleep(0.5)
    print(f"after the engine core's kill, (status, code, s): {seen}")
    assert seen[-1][0] == 200, seen  # served again, by a new replica
    assert "Paris" in response.json()["choices"][0]["message"]["content"]
    assert ("engine_dead" in {code for _, code, _ in seen}) and replica_lived_on, seen
    assert _replica_pid() != replica
