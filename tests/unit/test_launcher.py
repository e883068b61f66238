"""The launcher stops its child with one SIGINT, whatever the caller's signal state."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from llm_fleet.cli import launcher
from llm_fleet.router.drain import read_drain_end

SLEEPER = [sys.executable, "-c", "import time; print('ready', flush=True); time.sleep(60)"]


def _start_from_a_parent_ignoring_sigint() -> subprocess.Popen[bytes]:
    # As a background job of a non-interactive shell is started (nohup, CI, scripts).
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        process = launcher.start("unused", command=SLEEPER, stdout=subprocess.PIPE)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert process.stdout is not None and process.stdout.readline() == b"ready\n"
    return process


def test_child_stops_on_sigint_even_if_the_parent_ignored_it() -> None:
    process = _start_from_a_parent_ignoring_sigint()
    began = time.monotonic()
    code = launcher.stop(process, timeout=10)
    # Python exits through KeyboardInterrupt on SIGINT; a kill would be -SIGKILL.
    assert code in (-signal.SIGINT, 1, 130), code
    assert time.monotonic() - began < 5


GRANDPARENT = [
    sys.executable,
    "-c",
    "import subprocess, sys, time; child = subprocess.Popen([sys.executable, '-c', "
    "'import time; time.sleep(60)']); print(child.pid, flush=True); time.sleep(60)",
]


def test_stop_with_no_grace_kills_the_child_and_what_it_started() -> None:
    import psutil

    process = launcher.start("unused", command=GRANDPARENT, stdout=subprocess.PIPE)
    assert process.stdout is not None
    grandchild = psutil.Process(int(process.stdout.readline()))
    assert launcher.stop(process, timeout=0) == -signal.SIGKILL
    grandchild.wait(timeout=5)  # gone, not orphaned: raises TimeoutExpired otherwise


def test_a_local_cluster_is_started_on_loopback_unless_the_caller_chose() -> None:
    assert launcher.local_cluster_env({})[launcher.LOOPBACK_ONLY] == "0"
    # An operator who sets it keeps their choice; a named cluster is not started here.
    assert launcher.local_cluster_env({launcher.LOOPBACK_ONLY: "1"})[launcher.LOOPBACK_ONLY] == "1"
    assert launcher.LOOPBACK_ONLY not in launcher.local_cluster_env({"RAY_ADDRESS": "ray://h:1"})


ENV_PRINTER = [
    sys.executable,
    "-c",
    f"import os; print(os.environ.get({launcher.LOOPBACK_ONLY!r}), os.environ.get('MARK'))",
]


def test_start_hands_serve_run_the_loopback_setting_with_the_callers_env() -> None:
    process = launcher.start(
        "unused", command=ENV_PRINTER, env={"MARK": "x"}, stdout=subprocess.PIPE
    )
    out, _ = process.communicate(timeout=30)
    assert out.split() == [b"0", b"x"]


def test_disabling_ray_token_auth_is_warned_about(capsys: pytest.CaptureFixture[str]) -> None:
    launcher.local_cluster_env({"RAY_AUTH_MODE": "disabled"})
    assert "RAY_AUTH_MODE=disabled" in capsys.readouterr().err
    launcher.local_cluster_env({})
    assert capsys.readouterr().err == ""


def test_serving_settings_are_defaults_the_caller_can_override() -> None:
    env = launcher.local_cluster_env({})
    assert env["RAY_SERVE_PROXY_USE_GRPC"] == "1"
    # Answers of more than gRPC's default 4 MiB through that channel (a node's /metrics).
    assert int(env["RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH"]) >= 64 << 20
    # Measured and left at Ray's defaults (README, Performance): workers below Ray's
    # daemons, user code in its own thread.
    assert "RAY_worker_niceness" not in env
    assert "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD" not in env
    mine = launcher.local_cluster_env({"RAY_SERVE_PROXY_USE_GRPC": "0", "RAY_ADDRESS": "ray://h:1"})
    assert mine["RAY_SERVE_PROXY_USE_GRPC"] == "0"


# --- the drain before the stop --------------------------------------------------------


def _sleeper() -> subprocess.Popen[bytes]:
    process = launcher.start("unused", command=SLEEPER, stdout=subprocess.PIPE)
    assert process.stdout is not None and process.stdout.readline() == b"ready\n"
    return process


def _drain(
    folder: Path, grace_s: float, on_start: Callable[[], None] = lambda: None
) -> tuple[float, subprocess.Popen[bytes]]:
    process = _sleeper()
    on_start()
    try:
        waited = launcher.drain_then_stop(process, folder, grace_s, settle_s=0.1, poll_s=0.02)
        assert process.wait(timeout=10) == -signal.SIGINT  # stopped the clean way
    finally:
        launcher.kill_tree(process.pid)
    return waited, process


def test_the_drain_waits_for_the_routers_in_flight_requests(tmp_path: Path) -> None:
    busy = tmp_path / "busy-123"
    busy.touch()
    last_request_ends = threading.Timer(0.6, busy.unlink)
    before = time.time()
    waited, _ = _drain(tmp_path, grace_s=30, on_start=last_request_ends.start)
    assert 0.6 <= waited < 3  # not the whole grace
    end = read_drain_end(tmp_path)  # what the routers read
    assert end is not None and before + 30 <= end <= time.time() + 30


def test_the_drain_stops_at_the_grace_end_whatever_is_in_flight(tmp_path: Path) -> None:
    (tmp_path / "busy-123").touch()  # a request that never ends, or a router that died
    waited, _ = _drain(tmp_path, grace_s=0.5)
    assert 0.5 <= waited < 2.5


def test_with_nothing_in_flight_the_drain_only_lets_the_routers_see_it(tmp_path: Path) -> None:
    waited, _ = _drain(tmp_path, grace_s=30)
    assert waited < 1.5
