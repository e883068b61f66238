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
channel (items by value) instead of Ray actor calls, with that channel's receive limit
raised from gRPC's 4 MiB to 256 MiB (``RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH``: the
proxy gets a replica's ASGI messages in batches, and a larger one was a bare-text 500).
The other levers measured (workers
at nice 0, same-loop replicas, HAProxy, ``RAY_SERVE_THROUGHPUT_OPTIMIZED``) stay at
Ray's defaults; the README says why for each.

A cluster started some other way (KubeRay, ``ray start``) needs the same variables in
its nodes' environment (``infra/kuberay/rayservice.yaml`` sets it).

Where the gateway listens (``listen.py``): ``LLM_INFERENCE_HOSTNAME``, ``LLM_INFERENCE_PORT``
and ``SERVER_SSL_ENABLED`` with ``TLS_SERVER_CERT_PATH`` / ``TLS_SERVER_KEY_PATH`` replace
the config file's ``http_options``; ``serve run`` then gets a temporary copy of the file
with them (removed when it exits). TLS files that do not load stop the launcher before
anything starts.

Draining (``grace_s``, 30 s by default; ``llm-fleet serve --grace-s``): the launcher
gives the cluster a drain folder (``LLM_FLEET_DRAIN_DIR``, ``router/drain.py``). On the
first SIGINT or SIGTERM it writes the drain's end there: the routers refuse new
requests (503 ``shutting_down``) and give those in flight until then; once no router
replica has a request in flight (their ``busy-*`` files are gone), or at the end, Serve
is stopped as above. With ``grace_s=0`` the requests in flight are ended at once (503
``shutting_down``, or that error frame ending a stream; their generation stopped), and
Serve is stopped as soon as the routers have let go of them (about a second).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from types import FrameType

import psutil
import yaml

from llm_fleet.cli.listen import serve_config
from llm_fleet.deployments.errors import ConfigError

STOP_TIMEOUT_S = 60.0
GRACE_S = 30.0
DRAIN_ENV = "LLM_FLEET_DRAIN_DIR"
# How long the routers take to see a drain (they look every 0.2 s), and how often the
# launcher looks at their busy files.
DRAIN_SETTLE_S = 1.0
DRAIN_POLL_S = 0.2
LOOPBACK_ONLY = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
SERVING_ENV = {
    "RAY_SERVE_PROXY_USE_GRPC": "1",
    # Over that channel the proxy receives a replica's ASGI messages in batches, refused
    # over 4 MiB by default (a bare-text 500): a node's /metrics text was 4.6 MB.
    "RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH": str(256 << 20),
}


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


def _stop_serve(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        print("llm-fleet: stopping Serve, engines and the local Ray cluster...", flush=True)
        process.send_signal(signal.SIGINT)


def start_drain(folder: Path, grace_s: float) -> float:
    """Tell the routers following ``folder`` to drain for ``grace_s``; returns the end
    (Unix time) written to its ``draining`` file."""
    end = time.time() + grace_s
    staged = folder / ".draining"
    staged.write_text(f"{end}\n")
    staged.replace(folder / "draining")  # the routers see the whole end or nothing
    return end


def drain_then_stop(
    process: subprocess.Popen[bytes],
    folder: Path,
    grace_s: float,
    *,
    settle_s: float = DRAIN_SETTLE_S,
    poll_s: float = DRAIN_POLL_S,
) -> float:
    """Start a drain of ``grace_s`` in ``folder``, wait until no router has a request in
    flight (or the grace is over), then stop ``serve run``. Returns the seconds waited."""
    started = time.monotonic()
    end = start_drain(folder, grace_s)
    print(
        f"llm-fleet: draining: new requests get 503; those in flight have {grace_s:g} s",
        flush=True,
    )
    time.sleep(settle_s)
    while process.poll() is None and any(folder.glob("busy-*")) and time.time() < end + settle_s:
        time.sleep(poll_s)
    _stop_serve(process)
    return time.monotonic() - started


def _config_to_serve(config: str) -> Path | None:
    """The derived config ``serve run`` gets instead of ``config``, if any; says where
    it will listen and each file value the environment replaced."""
    derived, listen = serve_config(config, os.environ)
    for note in listen.notes:
        print(f"llm-fleet: {config}: {note}", file=sys.stderr, flush=True)
    applied = f" (with the environment's http_options: {derived})" if derived else ""
    print(f"llm-fleet: serving {config} at {listen.url}{applied}", flush=True)
    return derived


def serve_foreground(config: str, grace_s: float = GRACE_S) -> int:
    """Run until ``serve run`` exits or the launcher is told to stop.

    ``serve run`` gets ``config``, or a temporary copy with the listening variables
    applied (``listen.py``); an invalid one (a TLS file that does not load) ends it here
    with exit code 1, before anything starts.

    First SIGINT/SIGTERM: the drain (module docstring), then one SIGINT to ``serve
    run``, which stops Serve, the engines and the local cluster. A second one: kill it
    and everything under it. The handlers never wait on the child themselves (the main
    thread already does); the drain waits in a thread of its own.
    """
    try:
        derived = _config_to_serve(config)
    except (ConfigError, OSError, yaml.YAMLError) as exc:
        for line in str(exc).splitlines():
            print(f"llm-fleet: {config}: {line}", file=sys.stderr, flush=True)
        return 1
    process: subprocess.Popen[bytes] | None = None
    signals = 0
    given = os.environ.get(DRAIN_ENV)
    folder = Path(given or tempfile.mkdtemp(prefix="llm-fleet-drain-"))

    def _on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal signals
        signals += 1
        if process is None or process.poll() is not None:
            return
        if signals > 1:
            print("llm-fleet: killing serve run and everything it started", flush=True)
            kill_tree(process.pid)
        else:
            args = (process, folder, grace_s)
            threading.Thread(target=drain_then_stop, args=args, daemon=True).start()

    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    try:
        process = start(str(derived or config), env={**os.environ, DRAIN_ENV: str(folder)})
        code = process.wait()
    finally:
        if not given:
            shutil.rmtree(folder, ignore_errors=True)
        if derived:
            derived.unlink(missing_ok=True)
    return 0 if signals else code


if __name__ == "__main__":
    sys.exit(serve_foreground(sys.argv[1] if len(sys.argv) > 1 else "serve_config.local.yaml"))
