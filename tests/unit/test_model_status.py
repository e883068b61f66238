"""A model's state from Ray Serve's view and its replicas' phases: the whole rule, table-driven."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, field

import pytest

from llm_fleet.deployments.config import ModelConfig
from llm_fleet.deployments.replica_status import STALE_AFTER_S, Phase, ReplicaPhase
from llm_fleet.router.model_status import (
    RECENT_FAILURE_S,
    AlwaysReady,
    DeploymentView,
    ModelStatus,
    State,
    derive_status,
)

NOW = 1_700_000_000.0
SERVE_MESSAGE = "\n  Replica crashed in __init__: boom\nTraceback (most recent call last):\n  ..."


def model(min_replicas: int = 1, max_replicas: int = 2) -> ModelConfig:
    return ModelConfig.model_validate(
        {
            "id": "m",
            "source": "embedded://m",
            "autoscaling": {"min_replicas": min_replicas, "max_replicas": max_replicas},
        }
    )


def phase(
    kind: Phase,
    *,
    since_ago: float = 60.0,
    updated_ago: float = 1.0,
    reason: str | None = None,
    placement: dict[str, object] | None = None,
) -> ReplicaPhase:
    return ReplicaPhase(
        phase=kind,
        since=NOW - since_ago,
        updated=NOW - updated_ago,
        reason=reason,
        placement=placement,
    )


def view(status: str, message: str = "", **replica_states: int) -> DeploymentView:
    return DeploymentView(status=status, message=message, replica_states=replica_states)


@dataclass(frozen=True)
class Case:
    """Serve's view and the phases in; the state, reason and counts a user sees out."""

    state: State
    view: DeploymentView | None
    phases: Mapping[str, ReplicaPhase] = field(default_factory=dict)
    min_replicas: int = 1
    reason: str | None = None
    running: int = 0
    starting: int = 0
    loading_for_s: float | None = None


CASES = [
    pytest.param(Case("ready", view("HEALTHY", RUNNING=2), running=2), id="running"),
    pytest.param(
        Case("ready", view("UPDATING", RUNNING=1, STARTING=1), running=1, starting=1),
        id="running-while-another-starts",
    ),
    pytest.param(
        Case("ready", view("HEALTHY", PENDING_MIGRATION=1), running=1),
        id="pending-migration-still-serves",
    ),
    pytest.param(
        Case(
            "ready",
            view("DEPLOY_FAILED", "gave up", RUNNING=1),
            {"r9": phase("failed", reason="OOM")},
            running=1,
        ),
        id="a-running-replica-wins-over-deploy-failed",
    ),
    pytest.param(
        Case(
            "failed",
            view("DEPLOY_FAILED", SERVE_MESSAGE),
            {
                "r1": phase("failed", updated_ago=500, reason="old: weights missing"),
                "r2": phase("failed", updated_ago=20, reason="CUDA out of memory"),
                "r3": phase("failed", updated_ago=90, reason="middle: checksum mismatch"),
            },
            reason="CUDA out of memory",
        ),
        id="deploy-failed-quotes-the-newest-failed-phase",
    ),
    pytest.param(
        Case(
            "failed",
            view("DEPLOY_FAILED", SERVE_MESSAGE),
            reason="Replica crashed in __init__: boom",
        ),
        id="deploy-failed-else-the-first-line-of-serves-message",
    ),
    pytest.param(
        Case("failed", view("DEPLOY_FAILED"), reason="DEPLOY_FAILED"),
        id="deploy-failed-with-no-message-at-all",
    ),
    pytest.param(
        Case(
            "failed", view("UNHEALTHY", "health check failed\nmore"), reason="health check failed"
        ),
        id="unhealthy-with-nothing-starting",
    ),
    pytest.param(
        Case("loading", view("UNHEALTHY", "health check failed", STARTING=1), starting=1),
        id="unhealthy-but-a-replica-is-starting",
    ),
    pytest.param(
        Case(
            "downloading",
            view("UPDATING", STARTING=1),
            {"r1": phase("downloading", since_ago=42.0)},
            starting=1,
            loading_for_s=42.0,
        ),
        id="fresh-downloading-phase",
    ),
    pytest.param(
        Case(
            "downloading",
            view("UPSCALING", STARTING=2),
            {
                "r1": phase("loading", since_ago=30.0),
                "r2": phase("downloading", since_ago=75.0),
            },
            starting=2,
            loading_for_s=75.0,
        ),
        id="any-replica-downloading-and-the-oldest-since",
    ),
    pytest.param(
        Case(
            "loading",
            view("UPDATING", STARTING=1),
            {"r1": phase("loading", since_ago=12.5)},
            starting=1,
            loading_for_s=12.5,
        ),
        id="fresh-loading-phase",
    ),
    pytest.param(
        Case(
            "loading",
            view("UPDATING", STARTING=1),
            {"gone": phase("downloading", since_ago=600, updated_ago=STALE_AFTER_S + 1)},
            starting=1,
        ),
        id="a-stale-downloading-phase-is-ignored",
    ),
    pytest.param(
        Case(
            "downloading",
            view("UPDATING", STARTING=1),
            {"r1": phase("downloading", since_ago=5.0, updated_ago=STALE_AFTER_S)},
            starting=1,
            loading_for_s=5.0,
        ),
        id="a-phase-exactly-stale-after-s-old-still-counts",
    ),
    pytest.param(
        Case(
            "idle",
            view("HEALTHY"),
            {"gone": phase("loading", updated_ago=STALE_AFTER_S + 1)},
            min_replicas=0,
            reason="scaled to zero",
        ),
        id="a-stale-phase-does-not-keep-a-scaled-to-zero-model-loading",
    ),
    pytest.param(
        Case(
            "loading",
            view("UPDATING", STARTING=1),
            {
                "r1": phase("failed", updated_ago=30.0, reason="OOM while loading"),
                "r2": phase("loading", since_ago=10.0),
            },
            starting=1,
            reason="retrying after: OOM while loading",
            loading_for_s=10.0,
        ),
        id="recent-failure-while-retrying",
    ),
    pytest.param(
        Case(
            "loading",
            view("UPDATING", STARTING=1),
            {
                "r1": phase("failed", updated_ago=RECENT_FAILURE_S + 1, reason="long ago"),
                "r2": phase("loading", since_ago=10.0),
            },
            starting=1,
            loading_for_s=10.0,
        ),
        id="an-old-failure-is-not-quoted",
    ),
    pytest.param(
        Case("idle", view("HEALTHY"), min_replicas=0, reason="scaled to zero"),
        id="min-replicas-0-and-no-replicas",
    ),
    pytest.param(
        Case(
            "loading",
            view("UPDATING"),
            reason="waiting for Ray Serve to place a replica",
        ),
        id="min-replicas-1-and-nothing-placed-yet",
    ),
    pytest.param(Case("loading", None, reason="not deployed yet"), id="not-deployed-yet"),
    pytest.param(
        Case("loading", None, min_replicas=0, reason="not deployed yet"),
        id="not-deployed-yet-even-when-scaled-to-zero",
    ),
]


@pytest.mark.parametrize("case", CASES)
def test_derive_status(case: Case) -> None:
    status = derive_status(model(min_replicas=case.min_replicas), case.view, case.phases, NOW)
    assert (status.model, status.state, status.reason) == ("m", case.state, case.reason)
    assert (status.running, status.starting) == (case.running, case.starting)
    assert (status.min_replicas, status.max_replicas) == (case.min_replicas, 2)
    if case.loading_for_s is None:
        assert status.loading_for_s is None
    else:
        assert status.loading_for_s == pytest.approx(case.loading_for_s)


def test_the_reason_is_one_line_of_at_most_500_characters() -> None:
    status = derive_status(model(), view("DEPLOY_FAILED", "x" * 2000 + "\nsecond line"), {}, NOW)
    assert status.reason == "x" * 500


def test_a_phase_whose_since_lies_ahead_reports_zero_not_negative() -> None:
    # Clocks of different nodes disagree a little; a duration is never negative.
    ahead = {"r1": phase("loading", since_ago=-3.0, updated_ago=0.0)}
    status = derive_status(model(), view("UPDATING", STARTING=1), ahead, NOW)
    assert status.loading_for_s == 0.0


def test_as_json_is_what_health_shows() -> None:
    status = ModelStatus(
        model="m",
        state="downloading",
        min_replicas=0,
        max_replicas=3,
        running=0,
        starting=1,
        reason="retrying after: OOM",
        loading_for_s=12.3456,
    )
    assert status.as_json() == {
        "state": "downloading",
        "reason": "retrying after: OOM",
        "required_for_readiness": False,
        "replicas": {"running": 0, "starting": 1, "min": 0, "max": 3},
        "loading_for_s": 12.3,
        "placement": [],
    }
    assert ModelStatus(model="m", state="ready", min_replicas=1, max_replicas=1).required


def test_serving_replicas_show_where_they_run() -> None:
    """/health lists each live serving replica's node and cores; a stale one is gone."""
    phases = {
        "r2": phase("serving", placement={"node_id": "n1", "cpu_cores": [1], "shared": False}),
        "r1": phase("serving", placement={"node_id": "n1", "cpu_cores": [0], "shared": False}),
        "gone": phase("serving", updated_ago=STALE_AFTER_S + 1, placement={"node_id": "n2"}),
    }
    status = derive_status(model(), view("HEALTHY", RUNNING=2), phases, NOW)
    assert status.as_json()["placement"] == [
        {"replica": "r1", "node_id": "n1", "cpu_cores": [0], "shared": False},
        {"replica": "r2", "node_id": "n1", "cpu_cores": [1], "shared": False},
    ]


def test_a_serving_entry_is_not_a_replica_loading() -> None:
    """A serving replica's entry is fresh, but it must not make a scaled-to-zero model
    (or one Serve reports nothing for) look like it is loading."""
    phases = {"r1": phase("serving", placement={"node_id": "n1"})}
    status = derive_status(model(min_replicas=0), view("HEALTHY"), phases, NOW)
    assert (status.state, status.reason) == ("idle", "scaled to zero")


def test_always_ready_knows_nothing() -> None:
    source = AlwaysReady()
    source.wake("m")
    assert source.status("m") is None
    assert source.snapshot() == {}
    assert asyncio.run(source.wait_ready("m", 5.0)) is None
