"""``llm-fleet serve``'s drain, end to end: the launcher on a local cluster of its own.

Starts the launcher (``serve_foreground``, what ``llm-fleet serve FILE --grace-s N``
runs once the file is valid) on the real stack over the fake engine (one model, tokens
of 50 ms), starts a stream of ``tokens`` tokens, sends the launcher SIGTERM, then asks
for a new request. Returns what each got, how long the launcher took to exit and which
processes of its tree are left. It starts its own Ray cluster (loopback, port 8123), so
it runs with no other cluster on the machine: ``make test`` runs it after the shared
fleet is gone (``tests/process``), ``make drain-check`` prints it.
"""

from __future__ import annotations

import signal
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

REPO = Path(__file__).resolve().parents[2]
PORT = 8123
URL = f"http://127.0.0.1:{PORT}"
TOKEN_DELAY_S = 0.05
CONFIG = {
    "proxy_location": "HeadOnly",
    "http_options": {"host": "127.0.0.1", "port": PORT},
    "applications": [
        {
            "name": "fleet",
            "route_prefix": "/",
            "import_path": "tests.serve.fake_apps:build_fake_fleet",
            "args": {
                "router": {"num_cpus": 0.05},
                "models": [
                    {
                        "id": "m",
                        "source": "embedded://smollm2-135m-instruct",
                        "engine_args": {"token_delay_s": TOKEN_DELAY_S},
                        "resources": {"num_cpus": 0.05},
                        "autoscaling": {"min_replicas": 1, "max_replicas": 1},
                    }
                ],
            },
        }
    ],
}


@dataclass
class DrainRun:
    """What one SIGTERM during a stream did."""

    grace_s: float
    ready: bool = False
    stream: dict[str, Any] = field(default_factory=dict)  # status, end (last 400 chars), took_s
    new_request: dict[str, Any] = field(default_factory=dict)  # status, retry_after, body
    exit_code: int | None = None
    exit_after_s: float | None = None  # from SIGTERM to the launcher's exit
    left: list[int] = field(default_factory=list)  # pids of its tree still alive
    log: Path | None = None


def _stream(tokens: int, out: dict[str, Any]) -> None:
    body = {
        "model": "m",
        "messages": [{"role": "user", "content": "a b c"}],
        "max_tokens": tokens,
        "ignore_eos": True,
        "stream": True,
    }
    started = time.monotonic()
    try:
        response = httpx.post(f"{URL}/v1/chat/completions", json=body, timeout=120)
        out.update(status=response.status_code, end=response.text[-400:])
    except httpx.HTTPError as exc:
        out.update(error=repr(exc))
    out["took_s"] = round(time.monotonic() - started, 2)


def _wait_ready(launcher: subprocess.Popen[bytes], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while launcher.poll() is None and time.monotonic() < deadline:
        try:
            if httpx.get(f"{URL}/health/ready", timeout=2).status_code == 200:
                return True
        except httpx.HTTPError:
            pass  # not listening yet
        time.sleep(1)
    return False


def _new_request() -> dict[str, Any]:
    try:
        new = httpx.post(
            f"{URL}/v1/chat/completions",
            json={"model": "m", "messages": [{"role": "user", "content": "hi"}]},
            timeout=10,
        )
    except httpx.HTTPError as exc:
        return {"error": repr(exc)}
    return {
        "status": new.status_code,
        "retry_after": new.headers.get("retry-after"),
        "body": new.text[:400],
    }


def run_drain(grace_s: float, tokens: int, ready_timeout_s: float = 300) -> DrainRun:
    """Serve, stream ``tokens`` tokens, SIGTERM the launcher 0.5 s in, ask again 0.8 s
    later; then wait for the launcher's exit (killing its tree if it outlives 300 s)."""
    from llm_fleet.cli.launcher import kill_tree

    run = DrainRun(grace_s=grace_s)
    work = Path(tempfile.mkdtemp(prefix="llm-fleet-drain-run-"))
    config = work / "config.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    code = (
        "import sys; from llm_fleet.cli.launcher import serve_foreground; "
        f"sys.exit(serve_foreground({str(config)!r}, {grace_s}))"
    )
    run.log = work / "launcher.log"
    with run.log.open("w") as log:
        launcher = subprocess.Popen(
            [sys.executable, "-c", code], cwd=REPO, stdout=log, stderr=subprocess.STDOUT
        )
    try:
        run.ready = _wait_ready(launcher, ready_timeout_s)
        if not run.ready:
            return run
        worker = threading.Thread(target=_stream, args=(tokens, run.stream))
        worker.start()
        time.sleep(0.5)
        tree = [launcher.pid, *(p.pid for p in psutil.Process(launcher.pid).children(True))]
        signalled = time.monotonic()
        launcher.send_signal(signal.SIGTERM)
        time.sleep(0.8)
        run.new_request = _new_request()
        worker.join(120)
        run.exit_code = launcher.wait(300)
        run.exit_after_s = round(time.monotonic() - signalled, 1)
        time.sleep(2)
        run.left = [
            pid
            for pid in tree
            if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        ]
        return run
    finally:
        if launcher.poll() is None:
            kill_tree(launcher.pid)
