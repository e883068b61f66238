"""Serve apps for the reliability tests: llm-fleet's real stack (Serve proxy, router
replica, model replica) over the fake engine, whose cost the tests choose.

The fake engine's tokens take ``engine_args.token_delay_s`` each, and its start takes
``engine_args.start_delay_s``: a model replica restarting after a kill then has no live
replica for that long, as a real engine's minute of loading does, without spending it.
The engine arguments are the fake's own, never vLLM's.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx
from ray.serve import Application

from llm_fleet.deployments.builder import direct_app_name, load_config
from llm_fleet.deployments.config import ModelConfig
from llm_fleet.deployments.engine import EngineInfo
from llm_fleet.router.builder import build_direct
from llm_fleet.router.builder import build_fleet as build_real_fleet
from tests.fake_engine import FakeEngine


class SlowFakeEngine(FakeEngine):
    def __init__(self, model_id: str, *, start_delay_s: float, **options: Any) -> None:
        super().__init__(model_id, **options)
        self.start_delay_s = start_delay_s

    async def start(self) -> EngineInfo:
        await asyncio.sleep(self.start_delay_s)
        return await super().start()


def slow_fake_engine(model: ModelConfig, path: Path) -> FakeEngine:
    args = model.engine_args
    return SlowFakeEngine(
        model.id,
        max_model_len=int(args.get("max_model_len", 2048)),
        token_delay_s=float(args.get("token_delay_s", 0.01)),
        start_delay_s=float(args.get("start_delay_s", 0)),
    )


def build_fake_fleet(args: Mapping[str, Any]) -> Application:
    return build_real_fleet(load_config(args, os.environ), slow_fake_engine)


# One small router replica, for a test app beside the shared fleet.
ONE_ROUTER = {"num_cpus": 0.05, "autoscaling": {"min_replicas": 1, "max_replicas": 1}}


def fake_model(model_id: str, **fields: Any) -> dict[str, Any]:
    """A model entry for the fake engine: one small replica, a quick shutdown;
    ``fields`` add or replace config fields (``engine_args`` are the fake's own)."""
    return {
        "id": model_id,
        "source": "embedded://smollm2-135m-instruct",
        "resources": {"num_cpus": 0.05},
        "autoscaling": {"min_replicas": 1, "max_replicas": 1},
        "graceful_shutdown_timeout_s": 1,
        **fields,
    }


def wait_ready(url: str, timeout_s: float) -> None:
    """Until the app at ``url`` answers ``/health/ready`` with 200."""
    deadline = time.monotonic() + timeout_s
    while httpx.get(f"{url}/health/ready", timeout=10).status_code != 200:
        assert time.monotonic() < deadline, f"{url} not ready in {timeout_s} s"
        time.sleep(0.5)


@contextlib.contextmanager
def deployed(base_url: str, app: str, args: Mapping[str, Any], timeout_s: float) -> Iterator[str]:
    """The fake fleet of ``args`` as Serve app ``app`` on the shared cluster, at
    ``/<app>`` under ``base_url``, once ready; deleted afterwards. A ``direct: true``
    model's own app comes first (``<app>.<id>``, its door at ``/<app>/m/<id>/v1``)."""
    from ray import serve

    config = load_config(args, os.environ)
    direct = [direct_app_name(app, m.id) for m in config.models if m.direct]
    try:
        for model in config.models:
            if model.direct:
                serve.run(
                    build_direct(config, model.id, slow_fake_engine),
                    name=direct_app_name(app, model.id),
                    route_prefix=f"/{app}/m/{model.id}",
                )
        serve.run(build_real_fleet(config, slow_fake_engine), name=app, route_prefix=f"/{app}")
        wait_ready(f"{base_url}/{app}", timeout_s)
        yield f"{base_url}/{app}"
    finally:
        for name in [app, *direct]:
            serve.delete(name)
