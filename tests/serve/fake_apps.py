"""Serve apps for the reliability tests: llm-fleet's real stack (Serve proxy, router
replica, model replica) over the fake engine, whose cost the tests choose.

The fake engine's tokens take ``engine_args.token_delay_s`` each, and its start takes
``engine_args.start_delay_s``: a model replica restarting after a kill then has no live
replica for that long, as a real engine's minute of loading does, without spending it.
The engine arguments are the fake's own, never vLLM's.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ray.serve import Application

from llm_fleet.deployments.builder import load_config
from llm_fleet.deployments.config import ModelConfig
from llm_fleet.deployments.engine import EngineInfo
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
