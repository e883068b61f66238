"""Per-key quotas: requests per minute, tokens per minute, concurrent requests.

The app talks to a :class:`QuotaBackend` only: ``admit`` before a request is sent to
its model, ``release`` exactly once when it ends, however it ends. :class:`LocalQuota`
counts in this process; in Ray Serve, ``router/shared_quota.py`` runs it inside one
actor the router replicas share, so a key's limits hold for the whole app.

Semantics of :class:`LocalQuota`, per key id, over a sliding window of the last 60 s:

- ``rpm``: requests admitted in the window. Refused requests do not count; an admitted
  one counts even if it then fails (a 503 from a loading model, a 400 from the engine).
- ``tpm``: prompt + completion tokens of finished requests, counted at ``release`` with
  what each really used (the router passes its record's prompt + completion tokens; a
  stream cut short has only the completion tokens relayed before the client left, as
  the usage, prompt count included, comes at the end). A request is admitted while the
  window's count is below ``tpm``, so the requests in flight at that moment may
  together overshoot it; the overshoot keeps later requests out until it slides out of
  the window. ``est_tokens`` (the request's max_tokens) is not reserved here; a backend
  may reserve it.
- ``concurrency``: requests admitted and not yet released, counted per *holder*: the
  router replica that holds the slot (:data:`LOCAL_HOLDER` when counting in-process).
  ``admit``, ``release`` and ``renew`` each mark their holder as seen. With ``lease_s``
  set, a holder not seen for more than ``lease_s`` seconds (its process was killed, its
  node lost) has all its slots dropped at the next ``admit``, with one warning naming
  the holder and what was freed; live holders renew while they hold slots, saying how
  many they hold per key, which corrects the count for a release lost on the way. A
  release from a holder with no slot of that key (its lease lapsed) frees nothing, so it
  never frees another holder's slot, and its tokens still count for ``tpm``.

When several limits are reached the refusal names the first of concurrency, rpm, tpm.
``retry_after_s`` is when the window will have room again (at least 1 s); for
concurrency it is 1 s, as nothing says when a request in flight will end.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from llm_fleet.router.accounting import in_background
from llm_fleet.router.api_errors import GatewayBusyError, QuotaExceededError, QuotaLimit
from llm_fleet.router.auth import KeyLimits, Principal

WINDOW_S = 60.0
# The quota key of router.max_concurrent_requests: every request's second hold. No API
# key id can take this form (router/keys_file.py: eight hex digits).
GATEWAY_KEY_ID = "(gateway)"
# The holder of every slot when one process counts for itself.
LOCAL_HOLDER = "local"
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Admission:
    """A backend's answer: admitted, or refused by ``limit`` until ``retry_after_s``."""

    ok: bool
    limit: QuotaLimit | None = None
    retry_after_s: int = 0

    @classmethod
    def refused(cls, limit: QuotaLimit, retry_after_s: float) -> Admission:
        return cls(ok=False, limit=limit, retry_after_s=max(1, math.ceil(retry_after_s)))


ADMITTED = Admission(ok=True)


class QuotaBackend(Protocol):
    async def admit(self, principal: Principal, est_tokens: int) -> Admission:
        """Admit one request of ``principal`` (expected to use about ``est_tokens``)."""
        ...

    async def release(self, principal: Principal, tokens_used: int) -> None:
        """An admitted request ended, having used ``tokens_used`` tokens."""
        ...


@dataclass
class _KeyWindow:
    admitted: deque[float] = field(default_factory=deque)
    used: deque[tuple[float, int]] = field(default_factory=deque)
    used_total: int = 0
    held: dict[str, int] = field(default_factory=dict)  # holder -> slots in flight

    @property
    def in_flight(self) -> int:
        return sum(self.held.values())

    def expire(self, now: float) -> None:
        horizon = now - WINDOW_S
        while self.admitted and self.admitted[0] <= horizon:
            self.admitted.popleft()
        while self.used and self.used[0][0] <= horizon:
            self.used_total -= self.used.popleft()[1]

    def tokens_free_in(self, tpm: int, now: float) -> float:
        """Seconds until the window's token count drops below ``tpm``."""
        remaining = self.used_total
        for at, tokens in self.used:
            remaining -= tokens
            if remaining < tpm:
                return at + WINDOW_S - now
        return 0.0


class LocalQuota:
    """A :class:`QuotaBackend` counting in this process (see the module docstring).

    ``lease_s`` is how long a holder keeps its concurrency slots without being seen;
    ``None`` (in-process use: the only holder is this process) keeps them for ever.
    """

    def __init__(
        self, clock: Callable[[], float] = time.monotonic, lease_s: float | None = None
    ) -> None:
        self._clock = clock
        self._lease_s = lease_s
        self._windows: dict[str, _KeyWindow] = {}
        self._seen: dict[str, float] = {}  # holder -> when last seen

    async def admit(
        self, principal: Principal, est_tokens: int, holder: str = LOCAL_HOLDER
    ) -> Admission:
        limits = principal.limits
        now = self._clock()
        self._seen[holder] = now
        self._expire_holders(now)
        window = self._windows.setdefault(principal.id, _KeyWindow())
        window.expire(now)
        if limits.concurrency is not None and window.in_flight >= limits.concurrency:
            return Admission.refused("concurrency", 1)
        if limits.rpm is not None and len(window.admitted) >= limits.rpm:
            # Room again once all but rpm - 1 of the admitted requests have slid out.
            oldest_to_go = window.admitted[len(window.admitted) - limits.rpm]
            return Admission.refused("rpm", oldest_to_go + WINDOW_S - now)
        if limits.tpm is not None and window.used_total >= limits.tpm:
            return Admission.refused("tpm", window.tokens_free_in(limits.tpm, now))
        window.admitted.append(now)
        window.held[holder] = window.held.get(holder, 0) + 1
        return ADMITTED

    async def release(
        self, principal: Principal, tokens_used: int, holder: str = LOCAL_HOLDER
    ) -> None:
        now = self._clock()
        self._seen[holder] = now
        window = self._windows.setdefault(principal.id, _KeyWindow())
        held = window.held.pop(holder, 0)
        # No slot (its lease lapsed): nothing to free, and never another holder's slot.
        if held > 1:
            window.held[holder] = held - 1
        if tokens_used > 0:
            window.used.append((now, tokens_used))
            window.used_total += tokens_used

    async def renew(self, holder: str, held: Mapping[str, int] | None = None) -> None:
        """``holder`` is alive: its slots last another ``lease_s``.

        With ``held`` (key id -> requests the holder has in flight), the holder's slots
        are set to exactly that: the holder knows best. A release that never arrived (a
        call lost on the way) is undone, and slots this count lost (it was restarted
        empty) come back.
        """
        self._seen[holder] = self._clock()
        if held is None:
            return
        for key_id in {*self._windows, *held}:
            slots = held.get(key_id, 0)
            if slots > 0:
                self._windows.setdefault(key_id, _KeyWindow()).held[holder] = slots
            elif key_id in self._windows:
                self._windows[key_id].held.pop(holder, None)

    def snapshot(self) -> dict[str, Any]:
        """The counts as a plain dict, as the next ``admit`` would see them.

        ``keys``: per key id, ``in_flight``, ``admitted`` (requests in the window),
        ``tokens`` (used in the window) and ``holders`` (slots per holder); ``holders``:
        per holder, ``in_flight`` (over all keys) and ``seen_s_ago``.
        """
        now = self._clock()
        self._expire_holders(now)
        keys: dict[str, dict[str, Any]] = {}
        holding: Counter[str] = Counter()
        for key_id, window in self._windows.items():
            window.expire(now)
            keys[key_id] = {
                "in_flight": window.in_flight,
                "admitted": len(window.admitted),
                "tokens": window.used_total,
                "holders": dict(window.held),
            }
            holding.update(window.held)
        holders = {
            holder: {"in_flight": holding[holder], "seen_s_ago": now - seen}
            for holder, seen in self._seen.items()
        }
        return {"keys": keys, "holders": holders}

    def _expire_holders(self, now: float) -> None:
        if self._lease_s is None:
            return
        horizon = now - self._lease_s
        for holder in [h for h, seen in self._seen.items() if seen < horizon]:
            del self._seen[holder]
            freed = {
                key_id: slots
                for key_id, window in self._windows.items()
                if (slots := window.held.pop(holder, 0))
            }
            # A holder that went idle has nothing to free: forgotten without a word.
            if freed:
                logger.warning(
                    "quota holder %s not seen for over %g s: freed its %d concurrency "
                    "slot(s) (per key id: %s)",
                    holder,
                    self._lease_s,
                    sum(freed.values()),
                    freed,
                )


def quota_error(principal: Principal, admission: Admission) -> QuotaExceededError:
    """The 429 for a refused admission."""
    if admission.limit is None:
        raise ValueError("an admitted request has no quota error")
    value = {
        "rpm": principal.limits.rpm,
        "tpm": principal.limits.tpm,
        "concurrency": principal.limits.concurrency,
    }[admission.limit]
    return QuotaExceededError(admission.limit, value, admission.retry_after_s)


class QuotaHold:
    """One request's hold on its key's quota: taken at most once, released at most once.

    With no principal (auth off) both are no-ops.
    """

    def __init__(self, backend: QuotaBackend, principal: Principal | None) -> None:
        self.backend = backend
        self.principal = principal
        self._held = False

    async def take(self, est_tokens: int) -> None:
        """Admit the request, or raise QuotaExceededError (429)."""
        if self.principal is None or self._held:
            return
        principal = self.principal
        admitting = asyncio.ensure_future(self.backend.admit(principal, est_tokens))
        try:
            admission = await asyncio.shield(admitting)
        except asyncio.CancelledError:
            # The request ended (its client left) while the backend was deciding: an
            # admission that still comes is given back at once, never left held.
            in_background(self._give_back(principal, admitting))
            raise
        if not admission.ok:
            raise quota_error(self.principal, admission)
        self._held = True

    async def _give_back(self, principal: Principal, admitting: Awaitable[Admission]) -> None:
        if (await admitting).ok:
            await self.backend.release(principal, 0)

    @property
    def held(self) -> bool:
        """Whether a release has anything to give back (false without keys or a cap)."""
        return self._held

    async def release(self, tokens_used: int) -> None:
        if self.principal is None or not self._held:
            return
        self._held = False
        try:
            await self.backend.release(self.principal, tokens_used)
        except Exception:
            # The answer is already out; a lost release only costs the key some headroom.
            logger.exception("releasing the quota of key %s failed", self.principal.id)


def gateway_principal(limit: int | None) -> Principal | None:
    """The pseudo-key that counts every request for ``router.max_concurrent_requests``
    in the same backend as the keys' quotas (one count for all router replicas)."""
    if limit is None:
        return None
    return Principal(
        name="gateway", id=GATEWAY_KEY_ID, models=None, limits=KeyLimits(concurrency=limit)
    )


class GatewayHold(QuotaHold):
    """A request's slot in the gateway-wide cap; a refusal is 429 ``gateway_busy``."""

    async def take(self, est_tokens: int = 0) -> None:
        try:
            await super().take(0)
        except QuotaExceededError:
            assert self.principal is not None
            raise GatewayBusyError(self.principal.limits.concurrency or 0) from None
