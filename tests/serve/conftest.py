"""One running fleet for every serve test: real Ray Serve, real vLLM on CPU.

The app is started the way ``make serve`` starts it (``llm_fleet.cli.launcher`` →
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from llm_fleet.cli import launcher
from llm_fleet.deployments.weights import embedded
from llm_fleet.deployments.weights.s3_store import S3Store
from llm_fleet.deployments.weights.sources import parse_source
from tests.weights.hfmirror import Mirror, make_mirror_repo, start_mirror
from tests.weights.s3server import S3Server, start_s3_server

REPO = Path(__file__).resolve().parents[2]
APP = "fleet"
CHAT_MODEL = "smollm2-135m-instruct"
# serve_config.local.yaml serves SmolLM2 on the direct path too: its replicas are the
# ingress of their own app, which the router reaches (router/direct.py).
CHAT_MODEL_APP = f"{APP}.{CHAT_MODEL}"
DIRECT_PREFIX = f"/m/{CHAT_MODEL}"
COMPLETION_MODEL = "gemma-3-270m"
S3_MODEL = "smollm2-s3"
HF_MODEL = "smollm2-hf"
UNREACHABLE_MODEL = "unreachable-store"
# SmolLM2 with a context longer than the model allows: vLLM refuses to start it.
BROKEN_ENGINE_MODEL = "broken-engine"
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
    startup: StartupObservations
    pid: int  # the ``serve run`` process: Ray's local cluster runs under it


def free_port() -> int:
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


def _extra_models(commit: str) -> list[dict[str, Any]]:
    def model(model_id: str, source: str, **extra: Any) -> dict[str, Any]:
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
            **extra,
        }

    broken = model(BROKEN_ENGINE_MODEL, f"embedded://{CHAT_MODEL}")
    broken["engine_args"]["max_model_len"] = 1_000_000
    return [
        # Rejects requests while it has no replica (the default): 503 + Retry-After.
        model(S3_MODEL, f"s3://{WEIGHTS_BUCKET}/smollm2", unavailable={"retry_after_s": 2}),
        # Holds requests until a replica is up.
        model(HF_MODEL, f"hf://{MIRROR_REPO}@{commit}", unavailable={"action": "queue"}),
        # Port 9 (discard) is closed here: the store cannot be reached at all.
        model(
            UNREACHABLE_MODEL,
            f"s3://{WEIGHTS_BUCKET}/gone",
            env={"AWS_ENDPOINT_URL": "http://127.0.0.1:9"},
        ),
        broken,
    ]


def _test_config(tmp: Path, port: int, commit: str) -> Path:
    config: dict[str, Any] = yaml.safe_load((REPO / "serve_config.local.yaml").read_text())
    config["http_options"]["port"] = port
    app, direct = config["applications"]
    assert direct["name"] == CHAT_MODEL_APP and direct["route_prefix"] == DIRECT_PREFIX
    direct["deployments"] = [SCALING_OVERRIDE]
    # The direct app's args are a YAML merge of the fleet's: the same models list.
    assert direct["args"]["models"] is app["args"]["models"]
    app["args"]["models"] += _extra_models(commit)
    # Structured logs, the way an operator turns them on: one JSON object per line.
    for each in (app, direct):
        each["logging_config"] = {"encoding": "JSON"}
    path = tmp / "serve_config.test.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@dataclass
class StartupObservations:
    """What the fixture saw while the fleet started: the operations tests read it.

    ``readiness``: (seconds since start, /health/ready status, its body) at each
    change. ``loading_probes``: (seconds the answer took, status, Retry-After, body)
    of chat requests sent to SmolLM2 while /health/ready said it was not ready.
    """

    readiness: list[tuple[float, int, dict[str, Any]]] = field(default_factory=list)
    loading_probes: list[tuple[float, int, str | None, dict[str, Any]]] = field(
        default_factory=list
    )


def _probe_loading_model(base_url: str, seen: StartupObservations) -> None:
    body = {"model": CHAT_MODEL, "max_tokens": 1, "messages": [{"role": "user", "content": "Hi"}]}
    started = time.monotonic()
    reply = httpx.post(f"{base_url}/v1/chat/completions", json=body, timeout=30)
    elapsed = time.monotonic() - started
    if reply.status_code == 503:
        payload = reply.json()
        seen.loading_probes.append(
            (elapsed, reply.status_code, reply.headers.get("retry-after"), payload)
        )


def _wait_ready(base_url: str, process: Any, log: Path) -> StartupObservations:
    """Ready when /health/ready is 200 and every model that starts with a replica runs.

    Meanwhile, record the readiness changes and probe SmolLM2 while it loads.
    """
    seen = StartupObservations()
    deadline = time.monotonic() + READY_TIMEOUT_S
    started = time.monotonic()
    # The remote models start with one replica and may scale to zero soon after: each
    # must have been ready once, not all at the same moment.
    wanted = {CHAT_MODEL, COMPLETION_MODEL, S3_MODEL, HF_MODEL}
    was_ready: set[str] = set()
    last: tuple[int, dict[str, Any]] | None = None
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"serve run exited early:\n{log.read_text()[-5000:]}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"fleet not ready in {READY_TIMEOUT_S}s:\n{log.read_text()[-5000:]}")
        try:
            reply = httpx.get(f"{base_url}/health/ready", timeout=10)
            body = reply.json()
        except (httpx.HTTPError, ValueError):
            time.sleep(1)
            continue
        states = {m: s.get("state") for m, s in body.get("models", {}).items()}
        if last is None or (reply.status_code, states) != (last[0], last[1]):
            seen.readiness.append((time.monotonic() - started, reply.status_code, body))
            last = (reply.status_code, states)
        if reply.status_code != 200 and states.get(CHAT_MODEL) != "ready":
            _probe_loading_model(base_url, seen)
        was_ready |= {m for m, state in states.items() if state == "ready"}
        if reply.status_code == 200 and wanted <= was_ready:
            return seen
        time.sleep(1)


# Package scope: the fleet (about 15 GB here) is stopped as soon as the last serve
# test is done, not at the end of the whole run.
@pytest.fixture(scope="package")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    tmp = tmp_path_factory.mktemp("fleet")
    port = free_port()
    servers = _stage_weights(tmp)
    config = _test_config(tmp, port, servers.commit)
    log = tmp / "serve.log"
    env = {
        **os.environ,
        **servers.s3.env(),
        **servers.mirror.env(),
        "LLM_FLEET_WEIGHT_CACHE": str(tmp / "weight-cache"),
        "PYTHONUNBUFFERED": "1",
        # Workers hand their metrics to the node's agent every 2 s, not 10 s: the
        # Prometheus test sees a request counted sooner.
        "RAY_metrics_report_interval_ms": "2000",
    }
    try:
        with log.open("wb") as out:
            process = launcher.start(str(config), stdout=out, stderr=out, cwd=str(REPO), env=env)
        base_url = f"http://127.0.0.1:{port}"
        try:
            startup = _wait_ready(base_url, process, log)
            yield Fleet(base_url=base_url, log=log, startup=startup, pid=process.pid)
        finally:
            import ray

            if ray.is_initialized():
                _close_driver_handles()
                ray.shutdown()
            launcher.stop(process)
    finally:
        servers.stop()


def _close_driver_handles() -> None:
    """Stop the background tasks of this driver's Serve handles (their metrics push)
    before Ray goes: left running, each logs a traceback once Ray is shut down."""
    from ray.serve.context import _get_global_client

    client = _get_global_client(raise_if_no_controller_running=False)
    if client is not None:
        client.shutdown_cached_handles()


@pytest.fixture(scope="package")
def ray_driver(fleet: Fleet) -> Iterator[None]:
    """This test process as a second driver on the fleet's cluster (handles, status)."""
    import ray

    ray.init(address="auto", log_to_driver=False, logging_level="ERROR")
    yield


def app_of(model_id: str) -> str:
    """The Serve app holding a model's deployment (a direct model has its own)."""
    return CHAT_MODEL_APP if model_id == CHAT_MODEL else APP


def deployment_handle(name: str) -> Any:
    from ray import serve

    return serve.get_deployment_handle(name, app_name=app_of(name))
