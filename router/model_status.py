"""Each model's state, as /health, request gating and the status metrics see it.

States:

- ``ready``: at least one replica is RUNNING in Ray Serve.
- ``downloading`` / ``loading``: no replica runs yet and one is starting; the
  phase comes from the replicas themselves (``deployments/replica_status.py``).
- ``idle``: scaled to zero (``min_replicas: 0``, no replica, none starting). A
  request asks Serve for a replica (see ``ModelStatusSource.wake``).
- ``failed``: Ray Serve gave up (DEPLOY_FAILED), or the deployment is unhealthy with
  nothing starting. The reason is the newest failed replica's error, else Serve's
  own message.

:func:`derive_status` is the whole rule, a pure function; ``router/status_board.py``
feeds it from Ray Serve every ``router.status_poll_interval_s``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from llm_fleet.deployments.config import ModelConfig
from llm_fleet.deployments.errors import short_reason
from llm_fleet.deployments.replica_status import STARTING_PHASES, ReplicaPhase

State = Literal["ready", "downloading", "loading", "idle", "failed"]
STATES: tuple[State, ...] = ("ready", "downloading", "loading", "idle", "failed")
# A loading model quotes a replica's failure this recent as the reason it is retrying.
RECENT_FAILURE_S = 300.0


@dataclass(frozen=True)
class DeploymentView:
    """What Ray Serve reports of one model's deployment."""

    status: str  # HEALTHY, UPDATING, UPSCALING, DOWNSCALING, UNHEALTHY, DEPLOY_FAILED
    message: str = ""
    replica_states: Mapping[str, int] = field(default_factory=dict)

    def count(self, *states: str) -> int:
        return sum(self.replica_states.get(state, 0) for state in states)


@dataclass(frozen=True)
class ModelStatus:
    model: str
    state: State
    min_replicas: int
    max_replicas: int
    running: int = 0
    starting: int = 0
    reason: str | None = None
    loading_for_s: float | None = None
    # Where the serving replicas run: {"replica", "node_id", "cpu_cores", "how", "shared"}.
    placement: tuple[dict[str, Any], ...] = ()

    @property
    def required(self) -> bool:
        """Readiness waits for this model (``min_replicas > 0``)."""
        return self.min_replicas > 0

    def as_json(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "reason": self.reason,
            "required_for_readiness": self.required,
            "replicas": {
                "running": self.running,
                "starting": self.starting,
                "min": self.min_replicas,
                "max": self.max_replicas,
            },
            "loading_for_s": None if self.loading_for_s is None else round(self.loading_for_s, 1),
            "placement": list(self.placement),
        }


def derive_status(
    model: ModelConfig,
    view: DeploymentView | None,
    phases: Mapping[str, ReplicaPhase],
    now: float,
) -> ModelStatus:
    """The state of ``model`` from Serve's view of its deployment and its replicas' phases."""
    scaling = model.autoscaling

    def status(state: State, reason: str | None = None, **counts: Any) -> ModelStatus:
        return ModelStatus(
            model=model.id,
            state=state,
            min_replicas=scaling.min_replicas,
            max_replicas=scaling.max_replicas,
            reason=reason,
            **counts,
        )

    failures = sorted((p for p in phases.values() if p.phase == "failed"), key=lambda p: p.updated)
    last_failure = failures[-1].reason if failures else None
    recent = bool(failures) and now - failures[-1].updated < RECENT_FAILURE_S
    if view is None:
        return status("loading", "not deployed yet")
    running = view.count("RUNNING", "PENDING_MIGRATION")
    starting = view.count("STARTING", "UPDATING", "RECOVERING")
    placement = tuple(
        {"replica": replica, **(p.placement or {})}
        for replica, p in sorted(phases.items())
        if p.phase == "serving" and p.fresh(now)
    )
    counts: dict[str, Any] = {"running": running, "starting": starting, "placement": placement}
    if running > 0:
        return status("ready", **counts)
    if view.status == "DEPLOY_FAILED" or (view.status == "UNHEALTHY" and starting == 0):
        return status("failed", last_failure or short_reason(view.message) or view.status, **counts)
    loading = [p for p in phases.values() if p.phase in STARTING_PHASES and p.fresh(now)]
    if starting > 0 or loading:
        downloading = any(p.phase == "downloading" for p in loading)
        since = min((p.since for p in loading), default=None)
        return status(
            "downloading" if downloading else "loading",
            f"retrying after: {last_failure}" if recent else None,
            loading_for_s=None if since is None else max(0.0, now - since),
            **counts,
        )
    if scaling.min_replicas == 0:
        return status("idle", "scaled to zero", **counts)
    return status("loading", "waiting for Ray Serve to place a replica", **counts)


class ModelStatusSource(Protocol):
    """What the gateway asks about models; the real one polls Ray Serve."""

    def status(self, model_id: str) -> ModelStatus | None:
        """The latest known status; None before the first poll (requests then pass)."""
        ...

    def snapshot(self) -> dict[str, ModelStatus]:
        """Every model's latest status (empty before the first poll)."""
        ...

    def wake(self, model_id: str) -> None:
        """Ask Ray Serve for a replica of a model that has none (scale from zero)."""
        ...

    async def wait_ready(self, model_id: str, timeout_s: float) -> ModelStatus | None:
        """Wait until the model is ready or failed, or ``timeout_s`` passes."""
        ...


class AlwaysReady:
    """A status source that knows nothing: every request goes straight to its model."""

    def status(self, model_id: str) -> ModelStatus | None:
        return None

    def snapshot(self) -> dict[str, ModelStatus]:
        return {}

    def wake(self, model_id: str) -> None:
        return None

    async def wait_ready(self, model_id: str, timeout_s: float) -> ModelStatus | None:
        return None
