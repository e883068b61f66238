"""Per-key limits that hold across every router replica: one Ray actor counts for all.

The actor runs :class:`~router.quota.LocalLimits` (the same sliding windows), so the
semantics are exactly those of ``router/quota.py``, counted once for the whole app. A
router replica makes one actor call when it admits a request and one when the request
ends: no call per token. The actor is detached and named after the app, so replicas
that come and go (autoscaling, restarts) keep sharing it; it holds no secret (keys
arrive as their ids and limits).

If the actor cannot be reached within ``timeout_s`` (it is being restarted, the GCS is
briefly away), the replica counts locally until the next call succeeds and logs a
warning: availability first, with per-replica limits for that moment.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from ray.exceptions import RayError

from router.auth import Principal
from router.quota import Admission, LocalLimits

logger = logging.getLogger("llm_fleet.quota")
NAMESPACE = "llm_fleet"


class _LimitsActor:
    def __init__(self) -> None:
        self._limits = LocalLimits()

    async def admit(self, principal: Principal, est_tokens: int) -> Admission:
        return await self._limits.admit(principal, est_tokens)

    async def release(self, principal: Principal, tokens_used: int) -> None:
        await self._limits.release(principal, tokens_used)


def actor_name(app_name: str) -> str:
    return f"limits:{app_name}"


class SharedLimits:
    """A ``LimitBackend`` over the app's one limits actor (see the module docstring)."""

    def __init__(self, app_name: str, timeout_s: float = 2.0) -> None:
        self._name = actor_name(app_name)
        self._timeout = timeout_s
        self._actor: Any = None
        self._fallback = LocalLimits()

    def _get_actor(self) -> Any:
        import ray

        if self._actor is None:
            remote = ray.remote(num_cpus=0)(_LimitsActor)
            self._actor = remote.options(  # type: ignore[attr-defined]
                name=self._name, namespace=NAMESPACE, get_if_exists=True, lifetime="detached"
            ).remote()
        return self._actor

    async def _call(self, method: str, *args: Any) -> Any:
        actor = await asyncio.to_thread(self._get_actor)
        return await asyncio.wait_for(getattr(actor, method).remote(*args), self._timeout)

    async def admit(self, principal: Principal, est_tokens: int) -> Admission:
        try:
            admission: Admission = await self._call("admit", principal, est_tokens)
            return admission
        except (RayError, TimeoutError) as exc:
            self._actor = None
            logger.warning("limits actor unreachable (%s): counting in this replica", exc)
            return await self._fallback.admit(principal, est_tokens)

    async def release(self, principal: Principal, tokens_used: int) -> None:
        try:
            await self._call("release", principal, tokens_used)
        except (RayError, TimeoutError) as exc:
            self._actor = None
            logger.warning("limits actor unreachable (%s): released in this replica", exc)
            await self._fallback.release(principal, tokens_used)
