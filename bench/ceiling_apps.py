"""The two Serve apps of ``bench/router_ceiling.py``.

- ``build_fleet``: llm-fleet's real stack (Serve proxy → router replica → model replica)
  with a zero-cost engine: the fake engine with no delay between tokens.
- ``build_direct``: the same model's direct path (Serve proxy → model replica, which
  runs the router's OpenAI app in process: ``router/direct.py``), same zero-cost engine.
- ``build_echo``: one plain Ray Serve deployment that streams the same frames (the
  fake engine's) straight back: what Serve itself costs for a streamed answer.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

from ray import serve
from ray.serve import Application
from starlette.requests import Request
from starlette.responses import StreamingResponse

from llm_fleet.deployments.builder import direct_model_config, load_config
from llm_fleet.deployments.config import ModelConfig
from llm_fleet.deployments.engine import Reply
from llm_fleet.router.builder import build_direct as build_real_direct
from llm_fleet.router.builder import build_fleet as build_real_fleet
from tests.fake_engine import FakeEngine


def zero_cost_engine(model: ModelConfig, path: Path) -> FakeEngine:
    return FakeEngine(
        model.id, max_model_len=int(model.engine_args.get("max_model_len", 2048)), token_delay_s=0
    )


def build_fleet(args: Mapping[str, Any]) -> Application:
    return build_real_fleet(load_config(args, os.environ), zero_cost_engine)


def build_direct(args: Mapping[str, Any]) -> Application:
    config, model_id = direct_model_config(args, os.environ)
    return build_real_direct(config, model_id, zero_cost_engine)


@serve.deployment(max_ongoing_requests=1000, ray_actor_options={"num_cpus": 0.1})
class StreamingEcho:
    """Streams the fake engine's frames for a chat body, nothing else."""

    def __init__(self, model_id: str) -> None:
        self._engine = FakeEngine(model_id, token_delay_s=0)

    async def __call__(self, request: Request) -> StreamingResponse:
        body = await request.json()
        body["stream_options"] = {"include_usage": True}

        async def frames() -> AsyncIterator[str]:
            async for item in self._engine.generate("chat", body, "echo"):
                if not isinstance(item, Reply):
                    yield item

        return StreamingResponse(frames(), media_type="text/event-stream")


def build_echo(args: Mapping[str, Any]) -> Application:
    return StreamingEcho.bind(str(args.get("model", "echo")))
