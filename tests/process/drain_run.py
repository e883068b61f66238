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
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.process.launcher_run import (
    fake_fleet_config,
    launched,
    process_tree,
    wait_gone,
    wait_ready,
)

PORT = 8123
URL = f"http://127.0.0.1:{PORT}"
CONFIG = fake_fleet_config(PORT)


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
    run = DrainRun(grace_s=grace_s)
    with launched(CONFIG, grace_s) as launcher:
        run.log = launcher.log
        run.ready = wait_ready(launcher, f"{URL}/health/ready", ready_timeout_s)
        if not run.ready:
            return run
        worker = threading.Thread(target=_stream, args=(tokens, run.stream))
        worker.start()
        time.sleep(0.5)
        tree = process_tree(launcher)
        signalled = time.monotonic()
        launcher.process.send_signal(signal.SIGTERM)
        time.sleep(0.8)
        run.new_request = _new_request()
        worker.join(120)
        run.exit_code, run.exit_after_s, run.left = wait_gone(launcher, tree, signalled)
        return run
