"""Models added, changed and removed while serving, with the real vLLM engine.

``llm-fleet serve`` (the launcher: a local cluster, ``serve run FILE``) starts the router
app and model A, each model an app of its own (``build_model_app``). While one client
keeps asking A (streams and whole answers in turn), ``serve deploy`` applies three
files in turn, the way an operator would:

1. B added (its own app, ``fleet.<B>``, with ``direct: true``: also at ``/m/<B>/v1``),
   with a LoRA adapter served under its own id (``tests/lora_adapter.py`` makes it); B's
   and the adapter's greedy answers through both doors are kept;
2. B changed (its limits and autoscaling; Serve redeploys B's app alone);
3. B removed.

After each it waits for the router to follow (B listed and answering; B's new limit
enforced; B gone, 404). ``run_lifecycle`` returns every request A got, the pids of A's
replica and of the router replica before and after, and what B answered at each step;
``make lifecycle-check`` prints it, ``tests/process/test_lifecycle.py`` checks it. It
starts its own Ray cluster (loopback, port 8128): ``make test`` runs it after the shared
fleet is gone.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
import yaml

from tests.process.launcher_run import launched, report_main, wait_ready

PORT = 8128
URL = f"http://127.0.0.1:{PORT}"
MODEL_A = "smollm2-135m-instruct"
MODEL_B = "smollm2-b"  # the same small weights under a second id: a second engine
B_LIMIT = 64  # B's max_tokens_limit once changed


def _model(model_id: str, **fields: Any) -> dict[str, Any]:
    return {
        "id": model_id,
        "source": "embedded://smollm2-135m-instruct",
        "engine_args": {
            "max_model_len": 1024,
            "max_num_seqs": 8,
            "kv_cache_memory_bytes": 134217728,
        },
        "resources": {"num_cpus": 0.2},
        "autoscaling": {"min_replicas": 1, "max_replicas": 1},
        **fields,
    }


def _model_app(model: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": f"fleet.{model['id']}",
        "route_prefix": f"/m/{model['id']}" if model.get("direct") else None,
        "import_path": "llm_fleet.router.builder:build_model_app",
        "args": {"models": [model]},
    }


def config(b: dict[str, Any] | None = None) -> dict[str, Any]:
    """The Serve config: the router app, A's app, and B's app when ``b`` is given."""
    applications = [
        {
            "name": "fleet",
            "route_prefix": "/",
            "import_path": "llm_fleet.router.builder:build_app",
            "args": {
                "router": {"num_cpus": 0.1, "autoscaling": {"min_replicas": 1, "max_replicas": 1}},
                "models": [],
            },
        },
        _model_app(_model(MODEL_A)),
    ]
    if b is not None:
        applications.append(_model_app(b))
    return {
        "proxy_location": "HeadOnly",
        "http_options": {"host": "127.0.0.1", "port": PORT},
        "applications": applications,
    }


ADAPTER = "smollm2-b-pirate"  # a LoRA adapter of B (tests/lora_adapter.py)
B_DIRECT = f"/m/{MODEL_B}"  # B's own door: its replicas are its app's ingress


def b_added(adapter: Path) -> dict[str, Any]:
    return _model(MODEL_B, direct=True, adapters=[{"id": ADAPTER, "source": str(adapter)}])


def b_changed(adapter: Path) -> dict[str, Any]:
    return {
        **b_added(adapter),
        "limits": {"default_max_tokens": 32, "max_tokens_limit": B_LIMIT},
        "autoscaling": {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 4},
    }


@dataclass
class LifecycleRun:
    """What A's client got and where A and the router ran, before and after."""

    ready: bool = False
    pids_before: dict[str, list[int]] = field(default_factory=dict)  # "A", "router", "B"
    pids_after: dict[str, list[int]] = field(default_factory=dict)
    b_pids_changed: list[int] = field(default_factory=list)
    # B's greedy answers to one prompt, by B and by its adapter (twice), while B served,
    # through the router and through B's direct door.
    lora: dict[str, Any] = field(default_factory=dict)
    steps: list[dict[str, Any]] = field(default_factory=list)  # each serve deploy
    a_requests: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None
    log: str | None = None


def _replica_pids(app: str, deployment: str) -> list[int]:
    """The pids of the Serve replica actors of ``deployment`` in ``app``."""
    title = f"ray::ServeReplica:{app}:{deployment}"
    pids = []
    for process in psutil.process_iter(["cmdline"]):
        cmdline = process.info["cmdline"] or []
        if cmdline and cmdline[0].startswith(title) and not cmdline[0].startswith(f"{title}."):
            pids.append(process.pid)
    return sorted(pids)


def _pids() -> dict[str, list[int]]:
    return {
        "A": _replica_pids(f"fleet.{MODEL_A}", MODEL_A),
        "router": _replica_pids("fleet", "router"),
        "B": _replica_pids(f"fleet.{MODEL_B}", MODEL_B),
    }


def _ask(model: str, max_tokens: int = 8, stream: bool = False) -> dict[str, Any]:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "Name a colour."}],
        "max_tokens": max_tokens,
        "stream": stream,
    }
    try:
        reply = httpx.post(f"{URL}/v1/chat/completions", json=body, timeout=120)
    except httpx.HTTPError as exc:
        return {"exception": repr(exc)}
    out: dict[str, Any] = {"status": reply.status_code}
    if reply.status_code != 200:
        out["error"] = reply.json().get("error", {})
    elif stream:
        out["done"] = reply.text.rstrip().endswith("data: [DONE]")
        out["error_frame"] = '"error"' in reply.text
    return out


def _keep_asking_a(stop: threading.Event, out: list[dict[str, Any]]) -> None:
    stream = False
    while not stop.is_set():
        started = time.time()
        record = {"at": started, "stream": stream, **_ask(MODEL_A, stream=stream)}
        out.append(record)
        stream = not stream


def _listed(door: str = "") -> list[str]:
    return [m["id"] for m in httpx.get(f"{URL}{door}/v1/models", timeout=10).json()["data"]]


def _until(predicate: Any, timeout_s: float) -> float | None:
    """Seconds until ``predicate()`` held, or None after ``timeout_s``."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        try:
            if predicate():
                return round(time.monotonic() - started, 2)
        except (httpx.HTTPError, ValueError, KeyError):
            pass  # the answer is not there yet
        time.sleep(1)
    return None


def _serve_deploy(document: dict[str, Any], work: Path, name: str) -> dict[str, Any]:
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(document))
    serve = Path(sys.executable).with_name("serve")
    done = subprocess.run(
        [str(serve), "deploy", str(path), "--address", "http://127.0.0.1:8265"],
        capture_output=True,
        text=True,
        timeout=120,
        # The cluster's token (~/.ray/auth_token) is sent only in token mode.
        env={**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "token"},
    )
    return {"step": name, "deploy_rc": done.returncode, "deploy_out": done.stderr[-800:]}


def _b_answers() -> bool:
    return MODEL_B in _listed() and _ask(MODEL_B)["status"] == 200


def _b_limit_enforced() -> bool:
    answer = _ask(MODEL_B, max_tokens=B_LIMIT + 1)
    return answer.get("status") == 400 and str(B_LIMIT) in answer["error"].get("message", "")


def _b_gone() -> bool:
    gone = {MODEL_B, ADAPTER}.isdisjoint(_listed())
    return gone and _ask(MODEL_B).get("status") == 404 and _ask(ADAPTER).get("status") == 404


def _greedy(model: str, door: str = "") -> dict[str, Any]:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "Write one sentence about ships."}],
        "max_tokens": 24,
        "temperature": 0,
    }
    reply = httpx.post(f"{URL}{door}/v1/chat/completions", json=body, timeout=300)
    if reply.status_code != 200:
        return {"status": reply.status_code, "error": reply.text[:400]}
    answer = reply.json()
    return {
        "status": 200,
        "model": answer["model"],
        "text": answer["choices"][0]["message"]["content"],
    }


def _lora() -> dict[str, Any]:
    """The adapter next to its model: listed, and its greedy answer against B's, through
    the router and then through B's direct door (the same replica's engine)."""
    return {
        "listed": ADAPTER in _listed(),
        "base": _greedy(MODEL_B),
        "adapter": _greedy(ADAPTER),
        "adapter_again": _greedy(ADAPTER),
        "base_again": _greedy(MODEL_B),
        "direct_listed": _listed(B_DIRECT),
        "direct_adapter": _greedy(ADAPTER, B_DIRECT),
        "direct_base": _greedy(MODEL_B, B_DIRECT),
    }


def run_lifecycle(ready_timeout_s: float = 600) -> LifecycleRun:
    from llm_fleet.deployments.weights import embedded
    from tests.lora_adapter import make_adapter

    run = LifecycleRun()
    work = Path(tempfile.mkdtemp(prefix="llm-fleet-lifecycle-"))
    adapter = make_adapter(embedded.prepare("smollm2-135m-instruct"), work / "adapter")
    with launched(config(), grace_s=0) as launcher:
        run.log = str(launcher.log)
        run.ready = wait_ready(launcher, f"{URL}/health/ready", ready_timeout_s)
        if not run.ready:
            run.error = "the fleet did not get ready"
            return run
        run.pids_before = _pids()
        stop = threading.Event()
        asker = threading.Thread(target=_keep_asking_a, args=(stop, run.a_requests))
        asker.start()
        try:
            time.sleep(3)
            steps = [
                ("add", config(b_added(adapter)), _b_answers),
                ("change", config(b_changed(adapter)), _b_limit_enforced),
                ("remove", config(), _b_gone),
            ]
            for name, document, done in steps:
                step = {"started": time.time(), **_serve_deploy(document, work, name)}
                step["followed_after_s"] = _until(done, 420)
                if name == "add" and step["followed_after_s"] is not None:
                    run.lora = _lora()
                if name == "change":
                    # B's replica is replaced: B answers again from a new one.
                    step["answering_after_s"] = _until(_b_answers, 420)
                    run.b_pids_changed = _pids()["B"]
                step["pids"] = _pids()
                run.steps.append(step)
                if step["followed_after_s"] is None:
                    run.error = f"the router did not follow step {name!r}"
                    break
            time.sleep(3)
        finally:
            stop.set()
            asker.join(150)
        run.pids_after = _pids()
    return run


def main() -> None:
    report_main(__doc__ or "", run_lifecycle)


if __name__ == "__main__":
    main()
