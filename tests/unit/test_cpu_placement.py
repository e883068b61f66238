"""Engine core placement: each CPU engine replica on a node gets cores of its own."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from llm_fleet.deployments.config import CpuBindingConfig, ModelConfig
from llm_fleet.deployments.cpu_placement import (
    CoreClaims,
    engine_pool,
    format_core_list,
    parse_core_list,
    place_engine,
    this_process,
)
from llm_fleet.deployments.model_deployment import bind_engine_cores


class FakeLiveness:
    """Which claim owners count as alive (a real replica is a process)."""

    def __init__(self) -> None:
        self.dead: set[str] = set()

    def __call__(self, owner: str) -> bool:
        return owner not in self.dead


@pytest.fixture
def liveness() -> FakeLiveness:
    return FakeLiveness()


@pytest.fixture
def claims(tmp_path: Path, liveness: FakeLiveness) -> CoreClaims:
    return CoreClaims(tmp_path / "claims.json", alive=liveness)


def place(claims: CoreClaims, owner: str, **overrides: object):
    settings: dict[str, object] = {
        "num_cpus": 1.0,
        "configured": None,
        "env": {},
        "reserved_cores": 1,
        "available": [0, 1, 2, 3],
    }
    settings.update(overrides)
    return place_engine(claims=claims, owner=owner, **settings)  # type: ignore[arg-type]


def test_core_lists_parse_and_format() -> None:
    assert parse_core_list("0-2,5") == [0, 1, 2, 5]
    assert parse_core_list("3") == [3]
    assert format_core_list([0, 1, 5]) == "0,1,5"
    with pytest.raises(ValueError, match="core list"):
        parse_core_list("0-")
    with pytest.raises(ValueError, match="core list"):
        parse_core_list("auto")


def test_pool_keeps_the_last_cores_for_ray_and_the_router() -> None:
    assert engine_pool([0, 1, 2, 3], reserved=1) == [0, 1, 2]
    assert engine_pool([3, 2, 1, 0], reserved=2) == [0, 1]
    # Never an empty pool: a one-core machine still runs its engine.
    assert engine_pool([0], reserved=1) == [0]
    assert engine_pool([0, 1], reserved=5) == [0]


def test_two_models_on_one_node_get_different_cores(claims: CoreClaims) -> None:
    first = place(claims, "replica-a")
    second = place(claims, "replica-b")
    assert first is not None and second is not None
    assert first.cores == (0,) and second.cores == (1,)
    assert not first.shared and not second.shared
    assert first.how == second.how == "auto"


def test_num_cpus_sets_how_many_cores(claims: CoreClaims) -> None:
    big = place(claims, "big", num_cpus=2.5)
    half = place(claims, "half", num_cpus=0.5)
    assert big is not None and half is not None
    assert big.cores == (0, 1)
    assert half.cores == (2,)  # a fraction still gets one whole core


def test_a_used_up_pool_is_shared_and_says_so(
    claims: CoreClaims, caplog: pytest.LogCaptureFixture
) -> None:
    place(claims, "a", available=[0, 1])
    shared = place(claims, "b", available=[0, 1])
    assert shared is not None
    assert shared.cores == (0,) and shared.shared
    assert "shared with another engine" in caplog.text


def test_cores_of_a_dead_replica_are_free_again(claims: CoreClaims, liveness: FakeLiveness) -> None:
    place(claims, "a")
    liveness.dead.add("a")
    again = place(claims, "b")
    assert again is not None and again.cores == (0,) and not again.shared


def test_a_released_claim_frees_its_cores(claims: CoreClaims) -> None:
    place(claims, "a")
    claims.release("a")
    again = place(claims, "b")
    assert again is not None and again.cores == (0,)


def test_configured_cores_win_and_auto_claims_avoid_them(claims: CoreClaims) -> None:
    pinned = place(claims, "pinned", configured="0-1")
    auto = place(claims, "auto")
    assert pinned is not None and pinned.cores == (0, 1) and pinned.how == "config"
    assert auto is not None and auto.cores == (2,)


def test_operator_env_is_left_alone(claims: CoreClaims) -> None:
    assert place(claims, "a", env={"VLLM_CPU_OMP_THREADS_BIND": "auto"}) is None
    from_env = place(claims, "b", env={"VLLM_CPU_OMP_THREADS_BIND": "2"})
    assert from_env is not None and from_env.cores == (2,) and from_env.how == "env"
    assert place(claims, "c", env={}) is not None


def test_real_process_owners_expire_with_their_process(tmp_path: Path) -> None:
    """The default liveness check: a claim by a process that exited counts for nothing."""
    path = tmp_path / "claims.json"
    script = (
        "import sys; from pathlib import Path; sys.path.insert(0, sys.argv[2]);"
        "from llm_fleet.deployments.cpu_placement import CoreClaims, this_process;"
        "print(CoreClaims(Path(sys.argv[1])).claim(this_process(), 1, [0, 1]))"
    )
    repo = str(Path(__file__).resolve().parents[2])
    out = subprocess.run(
        [sys.executable, "-c", script, str(path), repo], check=True, capture_output=True, text=True
    )
    assert out.stdout.strip() == "([0], False)"
    assert len(json.loads(path.read_text())) == 1  # the child's claim was written
    claims = CoreClaims(path)
    cores, shared = claims.claim(this_process(), 1, [0, 1])
    assert (cores, shared) == ([0], False)  # the exited child no longer holds core 0
    assert list(json.loads(path.read_text())) == [this_process()]


def model_config(**resources: object) -> ModelConfig:
    return ModelConfig.model_validate(
        {"id": "m", "source": "embedded://m", "resources": {"num_cpus": 1, **resources}}
    )


def test_the_replica_binds_its_engine_through_vllms_variable(
    claims: CoreClaims, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    placement = bind_engine_cores(model_config(), CpuBindingConfig(reserved_cores=0), claims)
    assert placement is not None and placement.how == "auto"
    assert os.environ["VLLM_CPU_OMP_THREADS_BIND"] == format_core_list(placement.cores)


def test_gpu_models_and_binding_off_leave_vllm_alone(
    claims: CoreClaims, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    assert bind_engine_cores(model_config(num_gpus=1), CpuBindingConfig(), claims) is None
    assert bind_engine_cores(model_config(), CpuBindingConfig(mode="off"), claims) is None
    assert "VLLM_CPU_OMP_THREADS_BIND" not in os.environ


def test_config_checks_core_lists() -> None:
    assert model_config(cpu_cores="0-3").resources.cpu_cores == "0-3"
    with pytest.raises(ValidationError, match="cpu_cores"):
        model_config(cpu_cores="first")
    with pytest.raises(ValidationError, match="runs on GPUs"):
        model_config(cpu_cores="0", num_gpus=1)
