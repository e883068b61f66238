"""Draining on the real Serve stack: a router replica following a drain folder
(``router.drain_dir``, what ``llm-fleet serve`` gives its cluster) refuses new requests
through Serve's proxy with an OpenAI-shaped 503 ``shutting_down``, reports ``draining``
on ``/health/ready``, lets a stream that fits in the grace finish, ends one that does
not with a ``shutting_down`` error frame, and keeps its busy file only while requests
are in flight. The launcher's side (writing the drain, waiting on busy files, then
stopping ``serve run``) is ``tests/unit/test_launcher.py``; its stop is the one every
serve test run ends with.

The app is the real stack over the fake engine (``tests/serve/fake_apps.py``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from llm_fleet.cli.launcher import start_drain
from tests.serve.conftest import Fleet
from tests.serve.fake_apps import ONE_ROUTER, deployed, fake_model

pytestmark = [pytest.mark.serve, pytest.mark.slow]

APP = "drain"
MODEL = "drain-model"
TOKEN_DELAY_S = 0.05
GRACE_S = 3.0


@pytest.fixture(scope="module")
def drained_app(
    fleet: Fleet, ray_driver: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, Path]]:
    folder = tmp_path_factory.mktemp("drain")
    router = {**ONE_ROUTER, "drain_dir": str(folder)}
    model = fake_model(MODEL, engine_args={"token_delay_s": TOKEN_DELAY_S})
    with deployed(fleet.base_url, APP, {"router": router, "models": [model]}, 120) as url:
        yield url, folder


def _stream(url: str, tokens: int, out: dict[str, Any]) -> None:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "a b c"}],
        "max_tokens": tokens,
        "ignore_eos": True,
        "stream": True,
    }
    started = time.monotonic()
    response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
    out.update(status=response.status_code, text=response.text, took=time.monotonic() - started)


def test_a_drain_refuses_new_requests_and_bounds_those_in_flight(
    drained_app: tuple[str, Path],
) -> None:
    url, folder = drained_app
    short: dict[str, Any] = {}  # 1 s of tokens: fits in the grace
    long: dict[str, Any] = {}  # 10 s of tokens: does not
    threads = [
        threading.Thread(target=_stream, args=(url, 20, short)),
        threading.Thread(target=_stream, args=(url, 200, long)),
    ]
    for thread in threads:
        thread.start()
    time.sleep(0.3)
    started = time.monotonic()
    start_drain(folder, GRACE_S)
    time.sleep(0.5)  # the replica looks every 0.2 s
    busy = sorted(p.name for p in folder.glob("busy-*"))
    refused = httpx.post(
        f"{url}/v1/chat/completions",
        json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]},
        timeout=30,
    )
    ready = httpx.get(f"{url}/health/ready", timeout=30)
    for thread in threads:
        thread.join(timeout=30)
    ended = time.monotonic() - started
    time.sleep(0.6)
    busy_after = sorted(p.name for p in folder.glob("busy-*"))
    print(f"busy {busy} -> {busy_after}; long stream ended {ended:.1f} s into the drain")

    assert refused.status_code == 503, refused.text
    error = refused.json()["error"]
    assert error["code"] == "shutting_down"
    assert error["request_id"] == refused.headers["x-request-id"]
    assert 1 <= int(refused.headers["retry-after"]) <= GRACE_S + 1
    assert (ready.status_code, ready.json()["status"]) == (503, "draining")
    assert len(busy) == 1 and busy_after == []
    assert short["status"] == 200 and short["text"].rstrip().endswith("data: [DONE]")
    assert '"error"' not in short["text"]
    assert long["status"] == 200  # its headers had gone: the end is a frame
    frames = [f.removeprefix("data: ") for f in long["text"].split("\n\n") if f]
    assert frames[-1] == "[DONE]" and '"shutting_down"' in frames[-2], frames[-3:]
    assert GRACE_S - 0.5 <= ended <= GRACE_S + 3
