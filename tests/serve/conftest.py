"""One running fleet for every serve test: real Ray Serve, real vLLM on CPU.

The app is started the way ``make serve`` starts it (``deployments.launcher`` →
``serve run``), from ``serve_config.local.yaml`` with test edits: a free HTTP port; a
Ray Serve ``deployments:`` override of SmolLM2's autoscaling, written the way an
operator would (the scaling test relies on it); and three more models whose weights
come from real servers on loopback: SmolLM2 pushed to an S3 server (moto), SmolLM2
committed to an HF mirror (olah), and a model whose store is unreachable. Engine
starts cost about a minute each here, so the app is session-scoped and shared.
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

from deployments import embedded, launcher
from deployments.weights.s3_store import S3Store
from deployments.weights.sources import parse_source
from tests.weights.hfmirror import Mirror, make_mirror_repo, start_mirror
from tests.weights.s3server import S3Server, start_s3_server

REPO = Path(__file__).resolve().parents[2]
APP = "fleet"
CHAT_MODEL = "smollm2-135m-instruct"
COMPLETION_MODEL = "gemma-3-270m"
S3_MODEL = "smollm2-s3"
HF_MODEL = "smollm2-hf"
UNREACHABLE_MODEL = "unreachable-store"
WEIGHTS_BUCKET = "fleet-weights"
MIRROR_REPO = "fleet/smollm2-135m-instruct"
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


@dataclass(frozen=True)
class WeightServers:
    s3: S3Server
    mirror: Mirror
    commit: str

    def stop(self) -> None:
        self.mirror.stop()
        self.s3.stop()


def _stage_weights(tmp: Path) -> WeightServers:
    """SmolLM2 into a loopback S3 server and an HF mirror, as an operator stages it."""
    folder = embedded.prepare(CHAT_MODEL)
    s3 = start_s3_server(tmp / "s3")
    s3.create_bucket(WEIGHTS_BUCKET)
    S3Store(parse_source(f"s3://{WEIGHTS_BUCKET}/smollm2"), client=s3.client()).push(folder)
    mirrors = tmp / "mirrors"
    commit = make_mirror_repo(mirrors, MIRROR_REPO, folder, lfs=["*.safetensors"])
    return WeightServers(s3=s3, mirror=start_mirror(mirrors, tmp / "mirror"), commit=commit)


# Loaded at start (the fixture waits for them), then scaled to zero when idle: the
# node has no memory for them beside the scaling test's extra replica, and their own
# tests then start them again from zero through the router.
SCALE_TO_ZERO = {
    "min_replicas": 0,
    "initial_replicas": 1,
    "max_replicas": 1,
    "upscale_delay_s": 0,
    "downscale_delay_s": 5,
    "look_back_period_s": 5,
}


def _remote_models(commit: str) -> list[dict[str, Any]]:
    def model(model_id: str, source: str, **env: str) -> dict[str, Any]:
        return {
            "id": model_id,
            "source": source,
            "engine_args": {
                "max_model_len": 2048,
                "max_num_seqs": 8,
                "kv_cache_memory_bytes": 128 << 20,
            },
            "resources": {"num_cpus": 0.1},
            "autoscaling": SCALE_TO_ZERO,
            "env": env,
        }

    return [
        model(S3_MODEL, f"s3://{WEIGHTS_BUCKET}/smollm2"),
        model(HF_MODEL, f"hf://{MIRROR_REPO}@{commit}"),
        # Port 9 (discard) is closed here: the store cannot be reached at all.
        model(
            UNREACHABLE_MODEL, f"s3://{WEIGHTS_BUCKET}/gone", AWS_ENDPOINT_URL="http://127.0.0.1:9"
        ),
    ]


def _test_config(tmp: Path, port: int, commit: str) -> Path:
    config: dict[str, Any] = yaml.safe_load((REPO / "serve_config.local.yaml").read_text())
    config["http_options"]["port"] = port
    app = config["applications"][0]
    app["deployments"] = [SCALING_OVERRIDE]
    app["args"]["models"] += _remote_models(commit)
    path = tmp / "serve_config.test.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _wait_ready(base_url: str, process: Any, log: Path) -> None:
    """Ready when both models answer a one-token request through the router."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    pending = {
        CHAT_MODEL: "chat/completions",
        COMPLETION_MODEL: "completions",
        S3_MODEL: "chat/completions",
        HF_MODEL: "chat/completions",
    }
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


# Package scope: the fleet (about 15 GB here) is stopped as soon as the last serve
# test is done, not at the end of the whole run.
@pytest.fixture(scope="package")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    tmp = tmp_path_factory.mktemp("fleet")
    port = _free_port()
    servers = _stage_weights(tmp)
    config = _test_config(tmp, port, servers.commit)
    log = tmp / "serve.log"
    env = {
        **os.environ,
        **servers.s3.env(),
        **servers.mirror.env(),
        "LLM_FLEET_WEIGHT_CACHE": str(tmp / "weight-cache"),
        "PYTHONUNBUFFERED": "1",
    }
    try:
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
    finally:
        servers.stop()


@pytest.fixture(scope="package")
def ray_driver(fleet: Fleet) -> Iterator[None]:
    """This test process as a second driver on the fleet's cluster (handles, status)."""
    import ray

    ray.init(address="auto", log_to_driver=False, logging_level="ERROR")
    yield


def deployment_handle(name: str) -> Any:
    from ray import serve

    return serve.get_deployment_handle(name, app_name=APP)
