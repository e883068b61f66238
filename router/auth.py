"""API keys in the router: who is calling, and what that key may do.

:class:`KeyRing` holds the keys file's entries by hash and turns an
``Authorization: Bearer lfk_...`` header into a :class:`Principal` (or None: a
missing, malformed, unknown or revoked key, all alike). It re-reads the file when
its mtime, size or inode change, checked by a background task (:meth:`KeyRing.start`)
and also on access when the last check is older than ``poll_s``. A file that no
longer parses keeps the last good keys and logs why (field paths only: key
material, hashes included, never reaches a log).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from llm_fleet.deployments.background import Clock, PeriodicLoop, Sleep
from llm_fleet.deployments.config import FleetConfig
from llm_fleet.deployments.errors import ConfigError
from llm_fleet.router.api_errors import AuthenticationError
from llm_fleet.router.keys_file import ALL_MODELS, KEY_PREFIX, KeyEntry, hash_key, load_keys

logger = logging.getLogger(__name__)
# Longer than any key we issue, short enough that hashing it costs nothing.
_MAX_KEY_CHARS = 256
_Signature = tuple[int, int, int] | None


@dataclass(frozen=True)
class KeyLimits:
    """A key's own limits; None is no limit."""

    rpm: int | None = None
    tpm: int | None = None
    max_tokens: int | None = None
    concurrency: int | None = None


@dataclass(frozen=True)
class Principal:
    """The holder of a valid key. ``models`` None means every served model."""

    name: str
    id: str
    models: frozenset[str] | None
    limits: KeyLimits

    @classmethod
    def of(cls, entry: KeyEntry) -> Principal:
        models = None if ALL_MODELS in entry.models else frozenset(entry.models)
        limits = KeyLimits(entry.rpm, entry.tpm, entry.max_tokens, entry.concurrency)
        return cls(name=entry.name, id=entry.id, models=models, limits=limits)

    def may_use(self, model_id: str) -> bool:
        return self.models is None or model_id in self.models


def bearer_token(header: str | None) -> str | None:
    """The key in ``Bearer <key>``, or None for anything else."""
    if header is None:
        return None
    parts = header.split()
    if len(parts) != 2 or parts[0].lower() != "bearer":
        return None
    token = parts[1]
    if not token.startswith(KEY_PREFIX) or len(token) > _MAX_KEY_CHARS:
        return None
    return token


class KeyRing:
    """The valid keys, by hash; optionally kept in step with a keys file."""

    def __init__(
        self,
        entries: Iterable[KeyEntry] = (),
        *,
        path: str | Path | None = None,
        poll_s: float = 2.0,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self.path = Path(path) if path is not None else None
        self.poll_s = poll_s
        self._clock = clock
        self._by_hash: dict[str, tuple[bytes, Principal]] = {}
        self._signature: _Signature = None
        self._checked_at = clock()
        self._watch = PeriodicLoop(
            "keys file watch", self._refresh_tick, poll_s, sleep=sleep, logger=logger
        )
        self._install(entries)

    @classmethod
    def from_file(
        cls,
        path: str | Path,
        poll_s: float = 2.0,
        *,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
    ) -> KeyRing:
        """Load ``path`` now (a ConfigError if it is missing or invalid), then follow it."""
        signature = _signature(Path(path))
        ring = cls(load_keys(path).keys, path=path, poll_s=poll_s, clock=clock, sleep=sleep)
        ring._signature = signature
        return ring

    def _install(self, entries: Iterable[KeyEntry]) -> None:
        # One assignment: a request sees the old keys or the new ones, never a mix.
        self._by_hash = {
            e.hash: (e.hash.encode(), Principal.of(e)) for e in entries if not e.revoked
        }

    def __len__(self) -> int:
        """How many keys authenticate (revoked ones do not count)."""
        return len(self._by_hash)

    def authenticate(self, authorization: str | None) -> Principal | None:
        """The principal for an ``Authorization`` header value, or None."""
        self._refresh_if_due()
        token = bearer_token(authorization)
        if token is None:
            return None
        digest = hash_key(token).encode()
        # Every stored digest is compared, each in constant time, with no early exit:
        # how long this takes says nothing about which key, or how much of one, matched.
        # (A few hundred keys cost microseconds.)
        match: Principal | None = None
        for stored, principal in self._by_hash.values():
            if hmac.compare_digest(digest, stored):
                match = principal
        return match

    def require(self, authorization: str | None) -> Principal:
        """Like :meth:`authenticate`, but a missing principal is a 401 AuthenticationError."""
        principal = self.authenticate(authorization)
        if principal is None:
            raise AuthenticationError()
        return principal

    def _refresh_if_due(self) -> None:
        if self.path is not None and self._clock() - self._checked_at >= self.poll_s:
            self.refresh()

    def refresh(self) -> bool:
        """Re-read the file if it changed; True when new keys were installed."""
        if self.path is None:
            return False
        self._checked_at = self._clock()
        signature = _signature(self.path)
        if signature == self._signature:
            return False
        self._signature = signature
        try:
            if signature is None:
                raise ConfigError(f"{self.path}: cannot read: the file is gone")
            keys = load_keys(self.path)
        except ConfigError as exc:
            logger.error("keys file not reloaded, keeping the last good keys: %s", exc)
            return False
        self._install(keys.keys)
        logger.info(
            "keys file %s reloaded: %d active keys, %d revoked",
            self.path,
            len(self._by_hash),
            len(keys.keys) - len(self._by_hash),
        )
        return True

    async def start(self) -> None:
        """Watch the file in the background, every ``poll_s``."""
        if self.path is not None:
            self._watch.start()

    async def stop(self) -> None:
        await self._watch.stop()

    async def _refresh_tick(self) -> None:
        self.refresh()


def _signature(path: Path) -> _Signature:
    try:
        st = os.stat(path)
    except OSError:
        return None
    # A rename (how keys.py writes) changes the inode even within one mtime tick.
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def load_keyring(config: FleetConfig, poll_s: float = 2.0) -> KeyRing | None:
    """The router's keys from ``router.keys_file``; without one, None and a loud warning."""
    path = config.router.keys_file
    if path is None:
        logger.warning(
            "AUTH IS OFF: no router.keys_file (or LLM_FLEET_KEYS_FILE) is set, so anyone who "
            "can reach this gateway can use every model. Acceptable only on loopback or a "
            "trusted network; see README 'Security and API keys'."
        )
        return None
    ring = KeyRing.from_file(path, poll_s=poll_s)
    logger.info("API keys required: %d active keys from %s", len(ring), path)
    return ring
