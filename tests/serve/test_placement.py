"""Engine core placement on the real fleet: /health says where, and vLLM really binds there."""

from __future__ import annotations

import contextlib
import os
import time
from collections import Counter

import httpx
import psutil
import pytest

from tests.serve.conftest import CHAT_MODEL, COMPLETION_MODEL, Fleet, app_of

pytestmark = [pytest.mark.serve, pytest.mark.slow]
REPLICA_TITLE = "ray::ServeReplica:"


def _engine_workers(fleet: Fleet) -> dict[str, Counter[tuple[int, ...]]]:
    """Per model: the CPU affinity of each running vLLM worker process of the fleet."""
    found: dict[str, Counter[tuple[int, ...]]] = {}
    for proc in psutil.Process(fleet.pid).children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):
            if "VLLM::Worker" not in " ".join(proc.cmdline()):
                continue
            affinity = tuple(sorted(proc.cpu_affinity()))
            for parent in proc.parents():
                title = " ".join(parent.cmdline())
                if not title.startswith(REPLICA_TITLE):
                    continue
                # ray::ServeReplica:<app>:<deployment>; SmolLM2's app is its direct app.
                app, _, model = title.removeprefix(REPLICA_TITLE).split()[0].partition(":")
                if app == app_of(model):
                    found.setdefault(model, Counter())[affinity] += 1
                break
    return found


def test_each_serving_replica_reports_its_node_and_cores(fleet: Fleet) -> None:
    models = httpx.get(f"{fleet.base_url}/health/ready", timeout=10).json()["models"]
    cores = set(range(os.cpu_count() or 1))
    for model in (CHAT_MODEL, COMPLETION_MODEL):
        entry = models[model]
        assert entry["state"] == "ready"
        assert len(entry["placement"]) == entry["replicas"]["running"] >= 1
        for replica in entry["placement"]:
            assert replica["node_id"], replica
            assert replica["how"] == "auto"
            assert replica["cpu_cores"] and set(replica["cpu_cores"]) <= cores
            assert isinstance(replica["shared"], bool)


def _vllm_tree(fleet: Fleet) -> list[str]:
    """Every vLLM process of the fleet with its affinity and its parents' titles, for
    the failure message."""
    lines = []
    for proc in psutil.Process(fleet.pid).children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):
            title = " ".join(proc.cmdline())
            if title.startswith("VLLM::"):
                parents = [" ".join(parent.cmdline())[:60] for parent in proc.parents()[:3]]
                lines.append(f"{proc.pid} {title} {proc.cpu_affinity()} <- {parents}")
    return lines


def test_vllm_workers_run_on_the_cores_health_reports(fleet: Fleet) -> None:
    """The claim is not just a report: each engine's worker process is bound there.

    /health is refreshed every poll interval and an engine's processes come and go with
    its replica, so the two views are compared until they agree (30 s at most)."""
    deadline = time.monotonic() + 30
    while True:
        models = httpx.get(f"{fleet.base_url}/health/ready", timeout=10).json()["models"]
        workers = _engine_workers(fleet)
        reported = {
            model: Counter(tuple(r["cpu_cores"]) for r in models[model]["placement"])
            for model in (CHAT_MODEL, COMPLETION_MODEL)
        }
        if all(workers.get(model) == cores for model, cores in reported.items()):
            break
        assert time.monotonic() < deadline, (workers, reported, _vllm_tree(fleet))
        time.sleep(2)
    # The engines leave the node's last core (cpu_binding.reserved_cores: 1) to Ray and
    # the router, as long as the node has another one.
    if (os.cpu_count() or 1) > 1:
        for cores in reported.values():
            assert all((os.cpu_count() or 1) - 1 not in bound for bound in cores), cores
