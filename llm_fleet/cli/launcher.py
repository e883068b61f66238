"""``llm-fleet serve CONFIG``: ``serve run CONFIG`` in the foreground, stopped cleanly.

Why a wrapper: on this Ray release ``serve run`` shuts Serve, its engines and the local
Ray cluster down only on a SIGINT sent to its own process. A terminal's Ctrl-C goes to
the whole process group and leaves Ray and vLLM engine processes behind, and SIGTERM
is ignored. So ``serve run`` runs in its own session with SIGINT at its default, and
a SIGINT or SIGTERM to the launcher becomes one SIGINT to ``serve run``; a second one
kills ``serve run`` and every process under it (Ray's raylet, GCS, workers, engines),
and nothing else: never ``ray stop``, which would take other clusters on the machine
down too. :func:`stop` (tests, benchmarks) does the same after ``STOP_TIMEOUT_S``.

The local cluster ``serve run`` starts listens on loopback only: GCS, raylet, object
manager, dashboard and its agents, metrics export. Ray binds its servers to the node's
IP, and picks 127.0.0.1 when ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (meant for laptops,
it is the one switch that covers every one of those servers; ``ray start
--node-ip-address=127.0.0.1`` is resolved back to the host's address). The launcher sets
it unless the caller set it or names a cluster with ``RAY_ADDRESS``. Drivers that attach
to that cluster (``serve status``, ``ray.init(address="auto")``) need the same variable.
Ray's token auth, on by default for local clusters, is left on; with
``RAY_AUTH_MODE=disabled`` the launcher warns.

It also sets the one cluster-wide Ray Serve setting the gateway is measured faster
with (``SERVING_ENV``; README, Performance), only where the caller has not set it:
``RAY_SERVE_PROXY_USE_GRPC=1``, the Serve proxy reaching the router over Serve's gRPC
channel (items by value) instead of Ray actor calls. The other levers measured (workers
at nice 0, same-loop replicas, HAProxy, ``RAY_SERVE_THROUGHPUT_OPTIMIZED``) stay at
Ray's defaults; the README says why for each.

A cluster started some other way (KubeRay, ``ray start``) needs the same variable in
its nodes' environment (``infra/kuberay/rayservice.yaml`` sets it).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from types import FrameType

import psutil

STOP_TIMEOUT_S = 60.0
LOOPBACK_ONLY = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
SERVING_ENV = {"RAY_SERVE_PROXY_USE_GRPC": "1"}


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
    kill_tree(process.pid)
    return process.wait()


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and all its descendants, found before any of them dies (Ray's
    workers and vLLM's engine cores are children of the raylet and of the replicas)."""
    try:
        root = psutil.Process(pid)
        tree = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for proc in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()


def _reset_sigint() -> None:
    # A parent started in the background by a non-interactive shell ignores SIGINT,
    # and an ignored signal stays ignored across exec: serve run would then never see
    # the SIGINT that stops it cleanly.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def local_cluster_env(base: Mapping[str, str]) -> dict[str, str]:
    """``base`` plus what keeps a local cluster on loopback and the serving settings (see
    the module docstring); the caller's own values win."""
    env = {**SERVING_ENV, **base}
    if "RAY_ADDRESS" not in env:
        env.setdefault(LOOPBACK_ONLY, "0")
    if env.get("RAY_AUTH_MODE", "").lower() == "disabled":
        print(
            "llm-fleet: WARNING: RAY_AUTH_MODE=disabled: anyone who can reach the Ray "
            "cluster's ports can run code on it",
            file=sys.stderr,
            flush=True,
        )
    return env


def start(
    config: str,
    *,
    command: list[str] | None = None,
    env: Mapping[str, str] | None = None,
    **popen_kwargs: object,
) -> subprocess.Popen[bytes]:
    """Start ``serve run config`` (or ``command``) in a new session, SIGINT at default,
    with ``env`` (default: this process's) made loopback-only by :func:`local_cluster_env`."""
    argv = command if command is not None else [_bin("serve"), "run", config]
    return subprocess.Popen(  # type: ignore[call-overload, no-any-return]
        argv,
        start_new_session=True,
        preexec_fn=_reset_sigint,
        env=local_cluster_env(os.environ if env is None else env),
        **popen_kwargs,
    )


def serve_foreground(config: str) -> int:
    """Run until ``serve run`` exits or the launcher is told to stop.

    First SIGINT/SIGTERM: one SIGINT to ``serve run``, which stops Serve, the engines
    and the local cluster. A second one: kill it and everything under it. The
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
            print("llm-fleet: killing serve run and everything it started", flush=True)
            kill_tree(process.pid)

    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    process = start(config)
    code = process.wait()
    return 0 if signals else code


if __name__ == "__main__":
    sys.exit(serve_foreground(sys.argv[1] if len(sys.argv) > 1 else "serve_config.local.yaml"))
