"""Models added, changed and removed while serving (``tests/process/lifecycle_run.py``):
``serve deploy`` adds model B as an app of its own, changes it, removes it, while a client
keeps asking model A. A never fails and its replica keeps its pid, and so does the router's;
the router follows each step. One run (about 5 minutes, real vLLM) in a process of its
own; each test reads one part of it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.process.launcher_run import recorded_run

pytestmark = [pytest.mark.own_cluster, pytest.mark.slow]

RUN_TIMEOUT_S = 1800


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    work = tmp_path_factory.mktemp("lifecycle-run")
    recorded = recorded_run("tests.process.lifecycle_run", work, RUN_TIMEOUT_S)
    launcher_log = Path(recorded["log"]).read_text()[-5000:] if recorded["log"] else ""
    assert recorded["error"] is None, (recorded["error"], recorded["steps"], launcher_log)
    return recorded


def test_each_serve_deploy_is_followed_by_the_router(run: dict[str, Any]) -> None:
    assert [step["step"] for step in run["steps"]] == ["add", "change", "remove"]
    for step in run["steps"]:
        assert step["deploy_rc"] == 0, step["deploy_out"]
        assert step["followed_after_s"] is not None, step
    add, change, remove = run["steps"]
    assert len(add["pids"]["B"]) == 1  # B's replica, in an app of its own
    assert change["answering_after_s"] is not None  # B answers again after its redeploy
    assert run["b_pids_changed"] and run["b_pids_changed"] != add["pids"]["B"]
    assert remove["pids"]["B"] == []


def test_model_a_never_fails_while_b_comes_changes_and_goes(run: dict[str, Any]) -> None:
    asked = run["a_requests"]
    failed = [r for r in asked if r.get("status") != 200 or r.get("error_frame")]
    assert failed == []
    assert all(r["done"] for r in asked if r["stream"])
    # A was asked all through: before the first deploy and after the last step.
    first, last = run["steps"][0]["started"], run["steps"][-1]["started"]
    assert any(r["at"] < first for r in asked) and any(r["at"] > last for r in asked)
    assert len(asked) >= 50


def test_model_a_and_the_router_keep_their_replicas(run: dict[str, Any]) -> None:
    before, after = run["pids_before"], run["pids_after"]
    assert len(before["A"]) == 1 and len(before["router"]) == 1
    assert after["A"] == before["A"]
    assert after["router"] == before["router"]
    for step in run["steps"]:
        assert step["pids"]["A"] == before["A"] and step["pids"]["router"] == before["router"]


def test_a_lora_adapter_is_served_under_its_own_id_and_answers_differently(
    run: dict[str, Any],
) -> None:
    """vLLM's LoRA on CPU behind Serve's multiplexing: the adapter (rank 8 on q_proj and
    v_proj, tests/lora_adapter.py) changes B's greedy answer, the same each time."""
    lora = run["lora"]
    assert lora["listed"]
    for answer in (lora["base"], lora["adapter"], lora["adapter_again"], lora["base_again"]):
        assert answer["status"] == 200, answer
    assert lora["adapter"]["model"] == "smollm2-b-pirate"
    assert lora["adapter"]["text"] != lora["base"]["text"]
    assert lora["adapter_again"]["text"] == lora["adapter"]["text"]
    assert lora["base_again"]["text"] == lora["base"]["text"]


def test_b_direct_door_serves_its_adapter_as_the_router_does(run: dict[str, Any]) -> None:
    """``/m/<B>/v1`` (B's replicas as their app's ingress) lists B and its adapter and
    answers each as the router's door does: the same engine, the adapter loaded in it."""
    lora = run["lora"]
    assert sorted(lora["direct_listed"]) == ["smollm2-b", "smollm2-b-pirate"]
    for answer in (lora["direct_adapter"], lora["direct_base"]):
        assert answer["status"] == 200, answer
    assert lora["direct_adapter"]["model"] == "smollm2-b-pirate"
    assert lora["direct_adapter"]["text"] == lora["adapter"]["text"]
    assert lora["direct_base"]["text"] == lora["base"]["text"]
