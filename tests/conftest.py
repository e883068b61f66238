"""Session-wide guard: a test run must leave no Ray or vLLM engine process behind."""

from __future__ import annotations

import os

# A Serve handle's background thread calls ray.init() implicitly when the driver is
# gone, starting a stray local cluster after teardown; tests connect explicitly only.
# Read by Ray at import, so it must be set before anything imports ray.
os.environ["RAY_ENABLE_AUTO_CONNECT"] = "0"
# The launcher keeps the test cluster on loopback (llm_fleet/cli/launcher.py); a driver
# in this process finds it there only with the same setting, also read at import.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import psutil
import pytest

if TYPE_CHECKING:
    from playwright.sync_api import Browser

LEAK_MARKERS = ("raylet", "gcs_server", "EngineCore", "ray::", "serve run", "ray/dashboard")
_STARTED = pytest.StashKey[float]()


def _is_ray_or_engine(proc: psutil.Process) -> str | None:
    try:
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None  # exited already; only its parent's bookkeeping remains
        text = " ".join(proc.cmdline()) or proc.name()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None
    return text[:160] if any(marker in text for marker in LEAK_MARKERS) else None


def leftover_processes(since: float) -> dict[int, str]:
    """Ray/engine processes this session started: our descendants, and orphans
    (re-parented to init) created since the session began. Processes of another
    test session running beside this one are neither."""
    candidates = psutil.Process().children(recursive=True)
    for proc in psutil.process_iter():
        try:
            if proc.ppid() == 1 and proc.create_time() >= since:
                candidates.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    found = {}
    for proc in candidates:
        text = _is_ray_or_engine(proc)
        if text is not None:
            found[proc.pid] = text
    return found


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """Headless Debian chromium for a module's page tests (``tests/browser.py``). Module
    scope, not session: Playwright's sync API holds an event loop on the main thread
    while it runs, which other modules' ``asyncio.run`` and Serve handles must not meet."""
    from tests.browser import chromium

    with chromium() as launched:
        yield launched


def pytest_sessionstart(session: pytest.Session) -> None:
    session.stash[_STARTED] = time.time()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    since = session.stash.get(_STARTED, time.time())
    deadline = time.monotonic() + 30
    leftover: dict[int, str] = {}
    while time.monotonic() < deadline:
        leftover = leftover_processes(since)
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
