"""The readiness gate: whether a model can take a request now, and while it runs.

:func:`await_readiness` is the pipeline's readiness step (before the request is sent);
:func:`watch_readiness` guards the wait for the first item (the model may lose its last
replica after the request was sent). Both read the status board (``ModelStatusSource``).
"""

from __future__ import annotations

import asyncio

from llm_fleet.deployments.config import ModelConfig
from llm_fleet.router.api_errors import ModelNotReadyError
from llm_fleet.router.model_status import ModelStatusSource

# How often a request waiting for its first item looks at its model's status (memory).
MODEL_WATCH_S = 0.25


async def await_readiness(model: ModelConfig, source: ModelStatusSource) -> None:
    """Return when ``model`` can take a request; else raise ModelNotReadyError (503).

    Unknown status (before the first read) lets the request through to Serve. A model
    with ``unavailable.action: queue`` is waited for, up to its ``queue_timeout_s``.
    """
    status = source.status(model.id)
    if status is None or status.state == "ready":
        return
    policy = model.unavailable
    if status.state != "failed":
        source.wake(model.id)
        if policy.action == "queue":
            status = await source.wait_ready(model.id, policy.queue_timeout_s)
            if status is None or status.state == "ready":
                return
    raise ModelNotReadyError(model.id, status.state, policy.retry_after_s)


async def watch_readiness(model: ModelConfig, source: ModelStatusSource) -> None:
    """Raise ModelNotReadyError once ``model`` has no ready replica (in ``queue`` mode:
    none for ``queue_timeout_s``); never returns otherwise.

    A request sent just before the model lost its last replica (killed, its node gone)
    waits in Ray Serve's handle queue until a replacement runs, a minute or more for a
    real engine; this turns that wait into the 503 any request gets while the model is
    down (:func:`await_readiness`), as soon as the status board sees it.
    """
    while True:
        await asyncio.sleep(MODEL_WATCH_S)
        current = source.status(model.id)
        if current is not None and current.state != "ready":
            await await_readiness(model, source)  # ready again (queue mode), or the 503
