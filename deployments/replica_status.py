"""What a model replica is doing, beyond what Ray Serve knows of it.

Serve knows a replica is starting, not whether it is downloading weights or loading
the engine, nor why it failed until its retries are spent, nor which node and cores
its engine runs on. So each replica writes its phase to Ray's GCS key-value store (no
extra process; every worker can reach it) and refreshes it every few seconds: while
its constructor runs (``downloading``, ``loading``) and while it serves (``serving``,
with its placement); a failed one leaves its entry (with the reason) unrefreshed, and
one shutting down removes it. The router reads these entries
(``router/model_status.py``) and ignores entries not refreshed recently: a replica
killed mid-load or mid-serve leaves nothing that looks alive.

Key: ``<app>/<model>/<replica>`` in the ``llm_fleet_status`` namespace.
Value: JSON ``{"phase", "since", "updated", "reason", "placement"}``, times in epoch
seconds; ``placement`` (serving only): ``{"node_id", "cpu_cores", "how", "shared"}``.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any, Literal

from ray.exceptions import RayError

logger = logging.getLogger(__name__)

Phase = Literal["downloading", "loading", "serving", "failed"]
STARTING_PHASES = ("downloading", "loading")
NAMESPACE = "llm_fleet_status"
HEARTBEAT_S = 2.0
# An entry older than this belongs to a replica that is gone.
STALE_AFTER_S = 15.0
GCS_ERRORS = (RayError, ConnectionError, TimeoutError)


@dataclass(frozen=True)
class ReplicaPhase:
    phase: Phase
    since: float
    updated: float
    reason: str | None = None
    placement: dict[str, Any] | None = None

    def fresh(self, now: float) -> bool:
        return now - self.updated <= STALE_AFTER_S


def _key(app: str, model: str, replica: str) -> bytes:
    return f"{app}/{model}/{replica}".encode()


def read_phases(app: str, model: str) -> dict[str, ReplicaPhase]:
    """Every replica entry of ``model`` (fresh or not), keyed by replica id."""
    from ray.experimental import internal_kv

    prefix = _key(app, model, "")
    phases: dict[str, ReplicaPhase] = {}
    for key in internal_kv._internal_kv_list(prefix, namespace=NAMESPACE):
        raw = internal_kv._internal_kv_get(key, namespace=NAMESPACE)
        if raw is None:
            continue
        try:
            phases[key[len(prefix) :].decode()] = ReplicaPhase(**json.loads(raw))
        except (TypeError, ValueError):
            logger.warning("ignoring a malformed status entry %r", key)
    return phases


def delete_phase(app: str, model: str, replica: str) -> None:
    from ray.experimental import internal_kv

    internal_kv._internal_kv_del(_key(app, model, replica), namespace=NAMESPACE)


class PhaseReporter:
    """Writes one replica's phase, refreshed from a thread.

    A thread, not an asyncio task: loading the weights and starting vLLM block the
    replica's event loop for long stretches, and the heartbeat must go on meanwhile.
    """

    def __init__(self, app: str, model: str, replica: str):
        self._key = _key(app, model, replica)
        self._state = ReplicaPhase(phase="loading", since=time.time(), updated=time.time())
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def set(
        self, phase: Phase, reason: str | None = None, placement: dict[str, Any] | None = None
    ) -> None:
        now = time.time()
        with self._lock:
            since = self._state.since if phase == self._state.phase else now
            self._state = ReplicaPhase(
                phase=phase, since=since, updated=now, reason=reason, placement=placement
            )
        self._write()
        if phase != "failed" and self._thread is None:
            self._thread = threading.Thread(target=self._beat, name="llm-fleet-phase", daemon=True)
            self._thread.start()
        elif phase == "failed":
            # Kept without a heartbeat: the router shows the newest failure's reason.
            self._stop.set()

    def remove(self) -> None:
        """The replica is shutting down."""
        from ray.experimental import internal_kv

        self._stop.set()
        try:
            internal_kv._internal_kv_del(self._key, namespace=NAMESPACE)
        except GCS_ERRORS as exc:
            logger.warning("could not remove the replica phase: %s", exc)

    def _write(self) -> None:
        from ray.experimental import internal_kv

        with self._lock:
            self._state = ReplicaPhase(**{**asdict(self._state), "updated": time.time()})
            value = json.dumps(asdict(self._state)).encode()
        try:
            internal_kv._internal_kv_put(self._key, value, overwrite=True, namespace=NAMESPACE)
        except GCS_ERRORS as exc:  # the GCS briefly unreachable must not fail a model load
            logger.warning("could not publish the replica phase: %s", exc)

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            self._write()
