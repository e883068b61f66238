"""``llm-fleet serve CONFIG``: ``serve run CONFIG`` in the foreground, stopped cleanly.

Why a wrapper: on this Ray release ``serve run`` shuts Serve, its engines and the local
Ray cluster down only on a SIGINT sent to its own process. A terminal's Ctrl-C goes to
the whole process group and leaves Ray and vLLM engine processes behind, and SIGTERM
is ignored. So ``serve run`` runs in its own session, and a SIGINT or SIGTERM to
the launcher becomes one SIGINT to ``serve run``. If it has not exited after
``STOP_TIMEOUT_S``, the launcher kills it and runs ``ray stop --force``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import FrameType

STOP_TIMEOUT_S = 60.0


def _bin(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


def stop(process: subprocess.Popen[bytes], timeout: float = STOP_TIMEOUT_S) -> int:
    """Stop a ``serve run`` started by :func:`start`; returns its exit code.

    ``timeout=0`` skips the clean path and kills at once.
    """
    if process.poll() is None and timeout > 0:
        process.send_signal(signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            return process.wait(timeout=timeout)
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
        subprocess.run([_bin("ray"), "stop", "--force"], check=False, capture_output=True)
    return process.wait()


def start(config: str, **popen_kwargs: object) -> subprocess.Popen[bytes]:
    """Start ``serve run config`` in a new session (its own process group)."""
    return subprocess.Popen(  # type: ignore[call-overload, no-any-return]
        [_bin("serve"), "run", config], start_new_session=True, **popen_kwargs
    )


def serve_foreground(config: str) -> int:
    """Run until ``serve run`` exits or the launcher is told to stop."""
    process = start(config)
    stopping = False

    def _on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        if stopping:  # a second Ctrl-C: stop waiting for the clean path
            stop(process, timeout=0)
            return
        stopping = True
        print("llm-fleet: stopping Serve, engines and the local Ray cluster...", flush=True)
        process.send_signal(signal.SIGINT)

    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    try:
        code = process.wait()
    finally:
        if process.poll() is None:
            stop(process)
    return 0 if stopping else code


if __name__ == "__main__":
    sys.exit(serve_foreground(sys.argv[1] if len(sys.argv) > 1 else "serve_config.local.yaml"))
