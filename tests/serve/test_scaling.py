"""Autoscaling with the real engine: 1 → 2 replicas under load, back to 1 after it.

SmolLM2's autoscaling comes from the Ray Serve ``deployments:`` override in the test
config (target 2 ongoing requests, short delays), so this also shows that an
operator's per-model override in a Serve config file takes effect.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from typing import Any

import openai
import pytest

from tests.serve.conftest import CHAT_MODEL, CHAT_MODEL_APP, Fleet

pytestmark = [pytest.mark.serve, pytest.mark.slow]

LOAD_CLIENTS = 6
UP_TIMEOUT_S = 420
DOWN_TIMEOUT_S = 240


def _replica_states() -> Counter[str]:
    from ray import serve

    status = serve.status().applications[CHAT_MODEL_APP].deployments[CHAT_MODEL]
    return Counter({str(state): count for state, count in status.replica_states.items()})


def _running_replicas() -> int:
    states = _replica_states()
    return next((n for state, n in states.items() if state.endswith("RUNNING")), 0)


class Load:
    """Closed-loop clients sending chat requests until stopped; every failure is kept."""

    def __init__(self, fleet: Fleet, clients: int, max_tokens: int):
        self._client = openai.OpenAI(
            base_url=f"{fleet.base_url}/v1", api_key="unused", max_retries=0, timeout=300
        )
        self._stop = threading.Event()
        self._max_tokens = max_tokens
        self.ok = 0
        self.failures: list[str] = []
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._loop) for _ in range(clients)]

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                reply = self._client.chat.completions.create(
                    model=CHAT_MODEL,
                    messages=[{"role": "user", "content": "Tell me about the sea."}],
                    max_tokens=self._max_tokens,
                )
                assert reply.choices[0].message.content
                with self._lock:
                    self.ok += 1
            except Exception as exc:  # noqa: BLE001 - every failure is the finding
                with self._lock:
                    self.failures.append(repr(exc))

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=300)


def _wait_for(predicate: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(1)
    return False


@pytest.mark.usefixtures("ray_driver")
def test_scales_to_two_under_load_and_back_to_one(fleet: Fleet) -> None:
    assert _wait_for(lambda: _running_replicas() == 1 and sum(_replica_states().values()) == 1, 120)

    with Load(fleet, LOAD_CLIENTS, max_tokens=64) as load:
        scaled_up = _wait_for(lambda: _running_replicas() == 2, UP_TIMEOUT_S)
        served_before = load.ok
        # Keep the load on until the new replica has served its share.
        _wait_for(lambda: load.ok >= served_before + 2 * LOAD_CLIENTS, 120)
    assert scaled_up, f"never reached 2 replicas: {_replica_states()}"
    assert load.failures == [], load.failures[:5]
    assert load.ok > 0

    # A light trickle while the extra replica drains and stops.
    with Load(fleet, 1, max_tokens=8) as trickle:
        scaled_down = _wait_for(
            lambda: _running_replicas() == 1 and sum(_replica_states().values()) == 1,
            DOWN_TIMEOUT_S,
        )
    assert scaled_down, f"never returned to 1 replica: {_replica_states()}"
    assert trickle.failures == [], trickle.failures[:5]
    assert trickle.ok > 0
