"""``llm-fleet serve CONFIG``: ``serve run CONFIG`` in the foreground, stopped cleanly.

Why a wrapper: on this Ray release ``serve run`` shuts Serve, its engines and the local
Ray cluster down only on a SIGINT sent to its own process. A terminal's Ctrl-C goes to
the whole process group and leaves Ray and vLLM engine processes behind, and SIGTERM
is ignored. So ``serve run`` runs in its own session with SIGINT at its default, and
a SIGINT or SIGTERM to the launcher becomes one SIGINT to ``serve run``; a second one
kills it and runs ``ray stop --force``. :func:`stop` (tests, benchmarks) does the same
after ``STOP_TIMEOUT_S``.
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


def _reset_sigint() -> None:
    # A parent started in the background by a non-interactive shell ignores SIGINT,
    # and an ignored signal stays ignored across exec: serve run would then never see
    # the SIGINT that stops it cleanly.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start(
    config: str, *, command: list[str] | None = None, **popen_kwargs: object
) -> subprocess.Popen[bytes]:
    """Start ``serve run config`` (or ``command``) in a new session, SIGINT at default."""
    argv = command if command is not None else [_bin("serve"), "run", config]
    return subprocess.Popen(  # type: ignore[call-overload, no-any-return]
        argv, start_new_session=True, preexec_fn=_reset_sigint, **popen_kwargs
    )


def serve_foreground(config: str) -> int:
    """Run until ``serve run`` exits or the launcher is told to stop.

    First SIGINT/SIGTERM: one SIGINT to ``serve run``, which stops Serve, the engines
    and the local cluster. A second one: kill it, then ``ray stop --force``. The
    handlers never wait on the child themselves (the main thread already does).
    """
    process: subprocess.Popen[bytes] | None = None
    signals = 0

    def _on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal signals
        signals += 1
        if process is None or process.poll() is not None:
            return
        if signals == 1:
            print("llm-fleet: stopping Serve, engines and the local Ray cluster...", flush=True)
            process.send_signal(signal.SIGINT)
        else:
            print("llm-fleet: killing serve run", flush=True)
            os.killpg(process.pid, signal.SIGKILL)

    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    process = start(config)
    code = process.wait()
    if code == -signal.SIGKILL:
        subprocess.run([_bin("ray"), "stop", "--force"], check=False, capture_output=True)
    return 0 if signals else code


if __name__ == "__main__":
    sys.exit(serve_foreground(sys.argv[1] if len(sys.argv) > 1 else "serve_config.local.yaml"))
