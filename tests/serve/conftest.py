"""One running fleet for every serve test: real Ray Serve, real vLLM on CPU.

The app is started the way ``make serve`` starts it (``deployments.launcher`` →
``serve run``), from ``serve_config.local.yaml`` with two test edits: a free HTTP
port, and a Ray Serve ``deployments:`` override of SmolLM2's autoscaling, written the
way an operator would (the scaling test relies on it). Engine starts cost about a
minute each here, so the app is session-scoped and shared.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from deployments import launcher

REPO = Path(__file__).resolve().parents[2]
APP = "fleet"
CHAT_MODEL = "smollm2-135m-instruct"
COMPLETION_MODEL = "gemma-3-270m"
READY_TIMEOUT_S = 900
# Serve's own per-deployment override; differs from the YAML args on purpose.
SCALING_OVERRIDE = {
    "name": CHAT_MODEL,
    "autoscaling_config": {
        "min_replicas": 1,
        "max_replicas": 2,
        "target_ongoing_requests": 2,
        "upscale_delay_s": 3,
        "downscale_delay_s": 15,
        "look_back_period_s": 4,
    },
}


@dataclass(frozen=True)
class Fleet:
    base_url: str
    log: Path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _test_config(tmp: Path, port: int) -> Path:
    config: dict[str, Any] = yaml.safe_load((REPO / "serve_config.local.yaml").read_text())
    config["http_options"]["port"] = port
    config["applications"][0]["deployments"] = [SCALING_OVERRIDE]
    path = tmp / "serve_config.test.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _wait_ready(base_url: str, process: Any, log: Path) -> None:
    """Ready when both models answer a one-token request through the router."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    pending = {CHAT_MODEL: "chat/completions", COMPLETION_MODEL: "completions"}
    while pending:
        if process.poll() is not None:
            raise RuntimeError(f"serve run exited early:\n{log.read_text()[-5000:]}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"fleet not ready in {READY_TIMEOUT_S}s:\n{log.read_text()[-5000:]}")
        for model, route in list(pending.items()):
            body: dict[str, Any] = {"model": model, "max_tokens": 1}
            if route == "completions":
                body["prompt"] = "Hi"
            else:
                body["messages"] = [{"role": "user", "content": "Hi"}]
            try:
                reply = httpx.post(f"{base_url}/v1/{route}", json=body, timeout=30)
            except httpx.HTTPError:
                break
            if reply.status_code == 200:
                del pending[model]
        time.sleep(2)


@pytest.fixture(scope="session")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    tmp = tmp_path_factory.mktemp("fleet")
    port = _free_port()
    config = _test_config(tmp, port)
    log = tmp / "serve.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with log.open("wb") as out:
        process = launcher.start(str(config), stdout=out, stderr=out, cwd=str(REPO), env=env)
    base_url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(base_url, process, log)
        yield Fleet(base_url=base_url, log=log)
    finally:
        import ray

        if ray.is_initialized():
            ray.shutdown()
        launcher.stop(process)


@pytest.fixture(scope="session")
def ray_driver(fleet: Fleet) -> Iterator[None]:
    """This test process as a second driver on the fleet's cluster (handles, status)."""
    import ray

    ray.init(address="auto", log_to_driver=False, logging_level="ERROR")
    yield


def deployment_handle(name: str) -> Any:
    from ray import serve

    return serve.get_deployment_handle(name, app_name=APP)
