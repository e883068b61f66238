"""The engine contract on the real vLLM engine, through its Ray Serve deployment.

The same checks as ``tests/contract/test_fake_engine_contract.py``; passing both is
what keeps the fake engine honest.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from llm_fleet.deployments.engine import EngineRequest, Reply, Route
from tests.contract.engine_contract import CHAT_CHECKS, COMPLETIONS_CHECKS, Check
from tests.serve.conftest import CHAT_MODEL, COMPLETION_MODEL, deployment_handle

pytestmark = [pytest.mark.serve, pytest.mark.slow, pytest.mark.usefixtures("ray_driver")]


class DeploymentEngine:
    """The engine contract over a model deployment's handle (what the router uses)."""

    def __init__(self, model_id: str):
        self._handle = deployment_handle(model_id)

    async def generate(
        self, route: Route, body: dict[str, Any], request_id: str
    ) -> AsyncIterator[str | Reply]:
        response = self._handle.options(stream=True).generate.remote(
            EngineRequest(route, body, request_id)
        )
        try:
            async for item in response:
                yield item
        finally:
            response.cancel()

    async def num_unfinished_requests(self) -> int:
        return int(await self._handle.num_unfinished_requests.remote())


@pytest.mark.parametrize("check", CHAT_CHECKS, ids=lambda check: check.__name__)
def test_real_engine_meets_the_chat_contract(check: Check) -> None:
    asyncio.run(check(DeploymentEngine(CHAT_MODEL), CHAT_MODEL))


@pytest.mark.parametrize("check", COMPLETIONS_CHECKS, ids=lambda check: check.__name__)
def test_real_engine_meets_the_completions_contract(check: Check) -> None:
    asyncio.run(check(DeploymentEngine(COMPLETION_MODEL), COMPLETION_MODEL))
