"""Per-key quotas that hold across every router replica: one Ray actor counts for all.

The actor runs :class:`~llm_fleet.router.quota.LocalQuota` (the same sliding windows), so the
semantics are exactly those of ``router/quota.py``, counted once for the whole app. A
router replica makes one actor call when it admits a request and one when the request
ends: no call per token. The actor is detached and named after the app, so replicas
that come and go (autoscaling, restarts) keep sharing it; it holds no secret (keys
arrive as their ids and limits).

Concurrency lease: each :class:`SharedQuota` is one holder in the actor's count (the
router names it after its Serve replica). While it has requests in flight there, it
renews its hold every ``lease_s / 3`` (one call per replica per interval, whatever the
traffic), sending how many requests it has in flight per key: the actor sets this
holder's slots to exactly that, so a release that was lost (the actor unreachable at
that moment) is corrected at the next renewal, and a restarted, empty actor gets the
slots back. A replica that dies stops renewing, so its slots come back after at most
``lease_s`` (counted from its last call). A replica alive but unable to reach the actor
for longer than ``lease_s`` loses its slots in the count too, although its requests are
still running: the key can then briefly be admitted more than its concurrency, until
the next renewal that gets through.

If the actor cannot be reached within ``timeout_s`` (it is being restarted, the GCS is
briefly away), the replica counts locally until the next call succeeds and logs a
warning: availability first, with per-replica limits for that moment. A request is
released to the count that admitted it: while a key has requests admitted locally, its
releases go to the local count (a replica cannot tell its requests of one key apart,
so the counts agree once all of them have ended).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import Any

from ray.exceptions import RayError

from llm_fleet.deployments.background import Clock, PeriodicLoop, Sleep
from llm_fleet.router.auth import Principal
from llm_fleet.router.quota import Admission, LocalQuota

logger = logging.getLogger(__name__)
NAMESPACE = "llm_fleet"


class _QuotaActor:
    def __init__(self, lease_s: float | None = None, clock: Clock = time.monotonic) -> None:
        self._quota = LocalQuota(clock, lease_s=lease_s)

    async def admit(self, principal: Principal, est_tokens: int, holder: str) -> Admission:
        return await self._quota.admit(principal, est_tokens, holder)

    async def release(self, principal: Principal, tokens_used: int, holder: str) -> None:
        await self._quota.release(principal, tokens_used, holder)

    async def renew(self, holder: str, held: dict[str, int]) -> None:
        await self._quota.renew(holder, held)

    async def snapshot(self) -> dict[str, Any]:
        return self._quota.snapshot()


def actor_name(app_name: str) -> str:
    return f"limits:{app_name}"


class SharedQuota:
    """A ``QuotaBackend`` over the app's one limits actor (see the module docstring).

    ``holder`` names this instance in the actor's count (a random id if not given; the
    router passes its Serve replica id, so an operator can tell whose slots they are).
    ``lease_s`` is given to the actor when this instance creates it; with
    ``get_if_exists`` the first replica to create it sets the lease for all, and as the
    actor is detached a new value takes effect only once that actor is gone (killed).
    ``sleep`` is what the renewal loop waits with (a test injects a fake one).
    """

    def __init__(
        self,
        app_name: str,
        timeout_s: float = 2.0,
        lease_s: float = 30.0,
        holder: str | None = None,
        *,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self._name = actor_name(app_name)
        self._timeout = timeout_s
        self._lease_s = lease_s
        self._holder = holder or uuid.uuid4().hex
        self._actor: Any = None
        self._fallback = LocalQuota()
        # Key id -> requests of this replica counted by the actor and not yet released
        # (admissions on their way included, so a renewal never undercounts them).
        self._actor_held: dict[str, int] = {}
        self._local_held: dict[str, int] = {}  # key id -> requests admitted by the fallback
        self._renewal = PeriodicLoop(
            "renewing the quota lease",
            self._renew,
            lease_s / 3,
            while_=lambda: bool(self._actor_held),
            sleep=sleep,
            logger=logger,
        )

    def _get_actor(self) -> Any:
        import ray

        if self._actor is None:
            remote = ray.remote(num_cpus=0)(_QuotaActor)
            self._actor = remote.options(  # type: ignore[attr-defined]
                name=self._name, namespace=NAMESPACE, get_if_exists=True, lifetime="detached"
            ).remote(self._lease_s)
        return self._actor

    async def _call(self, method: str, *args: Any) -> Any:
        actor = await asyncio.to_thread(self._get_actor)
        return await asyncio.wait_for(getattr(actor, method).remote(*args), self._timeout)

    async def admit(self, principal: Principal, est_tokens: int) -> Admission:
        self._count(self._actor_held, principal.id, +1)
        try:
            admission: Admission = await self._call("admit", principal, est_tokens, self._holder)
        except (RayError, TimeoutError) as exc:
            self._count(self._actor_held, principal.id, -1)
            self._actor = None
            logger.warning("limits actor unreachable (%s): counting in this replica", exc)
            admission = await self._fallback.admit(principal, est_tokens)
            if admission.ok:
                self._count(self._local_held, principal.id, +1)
            return admission
        if not admission.ok:
            self._count(self._actor_held, principal.id, -1)
        else:
            self._renewal.start()  # no-op while it runs
        return admission

    @staticmethod
    def _count(counts: dict[str, int], key_id: str, change: int) -> None:
        value = counts.get(key_id, 0) + change
        if value > 0:
            counts[key_id] = value
        else:
            counts.pop(key_id, None)

    async def release(self, principal: Principal, tokens_used: int) -> None:
        if principal.id in self._local_held:
            self._count(self._local_held, principal.id, -1)
            await self._fallback.release(principal, tokens_used)
            return
        self._count(self._actor_held, principal.id, -1)
        try:
            await self._call("release", principal, tokens_used, self._holder)
        except (RayError, TimeoutError) as exc:
            self._actor = None
            # Not released locally: that would free the slot of a locally admitted request.
            logger.warning(
                "limits actor unreachable (%s): key %s's slot there is given back at the "
                "next renewal or when this replica's lease lapses; its tokens are not counted",
                exc,
                principal.id,
            )

    async def stop(self) -> None:
        """Stop renewing the lease (the replica is shutting down)."""
        await self._renewal.stop()

    async def _renew(self) -> None:
        """One renewal, while this replica has requests counted by the actor."""
        try:
            await self._call("renew", self._holder, dict(self._actor_held))
        except (RayError, TimeoutError) as exc:
            # Keep renewing: the slots are lost only once a whole lease goes by.
            self._actor = None
            logger.warning("renewing the quota lease failed (%s); retrying", exc)
