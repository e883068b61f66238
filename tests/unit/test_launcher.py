"""The launcher stops its child with one SIGINT, whatever the caller's signal state."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

from deployments import launcher

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


def test_stop_with_no_grace_kills_the_whole_session() -> None:
    process = launcher.start("unused", command=SLEEPER, stdout=subprocess.PIPE)
    assert process.stdout is not None and process.stdout.readline() == b"ready\n"
    assert launcher.stop(process, timeout=0) == -signal.SIGKILL
