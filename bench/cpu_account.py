"""Where the CPU went: seconds of CPU per kind of process over a span, from psutil.

The benchmark wraps each measured level in :func:`cpu_span` over the server's process
tree (and the benchmark client, this process), so every result says which process
spent the cores: vLLM's engine core and worker, the Serve replicas, Ray's own daemons.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator

import psutil

# First match wins: (label, substring of the process title or command line).
KINDS = (
    ("engine worker", "VLLM::Worker"),
    ("engine core", "EngineCore"),
    ("router replica", ":router"),
    ("model replica", "ServeReplica:"),
    ("serve proxy", "ProxyActor"),
    ("haproxy", "haproxy"),
    ("serve controller", "ServeController"),
    ("gcs_server", "gcs_server"),
    ("raylet", "raylet"),
    ("ray dashboard/agents", "dashboard"),
    ("ray other", "ray"),
    ("vllm api server", "vllm.entrypoints"),
)


def kind_of(proc: psutil.Process) -> str:
    try:
        text = " ".join(proc.cmdline()) or proc.name()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return "gone"
    return next((label for label, marker in KINDS if marker in text), "other")


def _cpu_seconds(roots: list[int]) -> dict[int, tuple[str, float]]:
    seen: dict[int, tuple[str, float]] = {}
    for root in roots:
        with contextlib.suppress(psutil.NoSuchProcess):
            top = psutil.Process(root)
            for proc in [top, *top.children(recursive=True)]:
                with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                    times = proc.cpu_times()
                    seen[proc.pid] = (kind_of(proc), times.user + times.system)
    return seen


@contextlib.contextmanager
def cpu_span(roots: list[int]) -> Iterator[Counter[str]]:
    """CPU seconds per kind spent by ``roots``' process trees while the block runs
    (filled in when it ends; the benchmark client is counted as ``client``)."""
    usage: Counter[str] = Counter()
    before = _cpu_seconds(roots)
    me = psutil.Process()
    mine = me.cpu_times().user + me.cpu_times().system
    yield usage
    after = _cpu_seconds(roots)
    for pid, (kind, seconds) in after.items():
        usage[kind] += seconds - before.get(pid, (kind, 0.0))[1]
    usage["client"] += me.cpu_times().user + me.cpu_times().system - mine
