"""Session-wide guard: a test run must leave no Ray or vLLM engine process behind."""

from __future__ import annotations

import os

# A Serve handle's background thread calls ray.init() implicitly when the driver is
# gone, starting a stray local cluster after teardown; tests connect explicitly only.
# Read by Ray at import, so it must be set before anything imports ray.
os.environ["RAY_ENABLE_AUTO_CONNECT"] = "0"

import time
from pathlib import Path

import psutil
import pytest

LEAK_MARKERS = ("raylet", "gcs_server", "EngineCore", "ray::", "serve run", "ray/dashboard")
_KEY = pytest.StashKey[set[int]]()


def ray_and_engine_processes() -> dict[int, str]:
    found: dict[int, str] = {}
    for proc in psutil.process_iter(["pid", "cmdline", "name", "status"]):
        if proc.info["status"] == psutil.STATUS_ZOMBIE:
            continue  # exited already; only its parent's bookkeeping remains
        try:
            text = " ".join(proc.info["cmdline"] or []) or (proc.info["name"] or "")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if any(marker in text for marker in LEAK_MARKERS):
            found[proc.info["pid"]] = text[:160]
    return found


def pytest_sessionstart(session: pytest.Session) -> None:
    session.stash[_KEY] = set(ray_and_engine_processes())


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    before = session.stash.get(_KEY, set())
    deadline = time.monotonic() + 30
    leftover = {}
    while time.monotonic() < deadline:
        leftover = {p: c for p, c in ray_and_engine_processes().items() if p not in before}
        if not leftover:
            return
        time.sleep(1)
    report = Path(session.config.rootpath) / ".pytest_cache" / "leftover-processes.txt"
    report.parent.mkdir(exist_ok=True)
    report.write_text("\n".join(f"{p} {c}" for p, c in leftover.items()))
    print(f"\nFAILED: {len(leftover)} Ray/engine processes left running (see {report}):")
    for pid, cmd in leftover.items():
        print(f"  {pid} {cmd}")
        try:
            psutil.Process(pid).kill()
        except psutil.NoSuchProcess:
            continue
    session.exitstatus = pytest.ExitCode.TESTS_FAILED
