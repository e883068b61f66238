"""Cores of its own for each CPU engine replica on a node.

vLLM's CPU build binds its OpenMP threads with ``VLLM_CPU_OMP_THREADS_BIND``. Left at
``auto``, every engine on a node picks the same cores (the first ones of the NUMA node,
less one reserved for its scheduler), so two models on one host share one core while
the others idle. Ray does not pin actors to cores either: ``num_cpus`` is a count.

So each CPU model replica claims cores before its engine starts:

- ``resources.cpu_cores`` in the model's config (vLLM's list syntax, ``"0-3"``,
  ``"4,6"``) binds exactly those cores;
- ``VLLM_CPU_OMP_THREADS_BIND`` in the model's ``env`` is the operator's own choice and
  is left alone (claimed when it names cores, so automatic claims avoid them);
- otherwise (``cpu_binding.mode: auto``) the replica takes ``max(1, floor(num_cpus))``
  cores from the node's pool: every core this process may run on, less the last
  ``cpu_binding.reserved_cores``, which stay for Ray, the Serve proxy, the router and
  the engines' schedulers. Free cores go first; when the pool is used up, the least
  shared ones are shared and the placement says so (``shared``).

Claims live in one JSON file per node (``$TMPDIR/llm-fleet/cpu-claims.json``) under a
file lock, keyed by process id and start time; a claim whose process is gone counts
for nothing, so a killed replica frees its cores without cleanup. With
``cpu_binding.mode: off`` vLLM's own ``auto`` runs as it would alone.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import psutil
from filelock import FileLock

logger = logging.getLogger(__name__)

BIND_ENV = "VLLM_CPU_OMP_THREADS_BIND"
CORE_LIST_PATTERN = r"^\d+(-\d+)?(,\d+(-\d+)?)*$"
How = Literal["config", "env", "auto"]


def parse_core_list(text: str) -> list[int]:
    """``"0-2,5"`` → ``[0, 1, 2, 5]`` (vLLM's syntax for one engine's cores)."""
    if not re.fullmatch(CORE_LIST_PATTERN, text):
        raise ValueError(f"not a core list like '0-3' or '0,2': {text!r}")
    cores: list[int] = []
    for part in text.split(","):
        first, _, last = part.partition("-")
        cores.extend(range(int(first), int(last or first) + 1))
    return sorted(set(cores))


def format_core_list(cores: Sequence[int]) -> str:
    return ",".join(str(core) for core in cores)


@dataclass(frozen=True)
class CorePlacement:
    """The cores one engine replica runs its OpenMP threads on."""

    cores: tuple[int, ...]
    how: How
    shared: bool = False  # another live engine on this node holds one of these cores

    def as_json(self) -> dict[str, object]:
        return {"cpu_cores": list(self.cores), "how": self.how, "shared": self.shared}


def _owner_alive(owner: str) -> bool:
    pid, _, started = owner.partition(":")
    try:
        return f"{psutil.Process(int(pid)).create_time():.2f}" == started
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
        return False


def this_process() -> str:
    """This process as a claim owner: pid and start time (pids are reused)."""
    return f"{os.getpid()}:{psutil.Process().create_time():.2f}"


class CoreClaims:
    """The node's claims file: which live engine replica holds which cores."""

    def __init__(
        self, path: Path | None = None, alive: Callable[[str], bool] = _owner_alive
    ) -> None:
        self._path = path or Path(tempfile.gettempdir()) / "llm-fleet" / "cpu-claims.json"
        self._alive = alive

    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict[str, list[int]]]:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self._path) + ".lock"):
            try:
                claims = json.loads(self._path.read_text())
            except (FileNotFoundError, ValueError):
                claims = {}
            live = {o: list(c) for o, c in claims.items() if self._alive(o)}
            yield live
            tmp = self._path.with_suffix(".tmp")
            tmp.write_text(json.dumps(live))
            tmp.replace(self._path)

    def claim(self, owner: str, count: int, pool: Sequence[int]) -> tuple[list[int], bool]:
        """The ``count`` least-held cores of ``pool`` for ``owner``, and whether any of
        them was already held."""
        with self._locked() as claims:
            claims.pop(owner, None)
            load = Counter(core for cores in claims.values() for core in cores)
            chosen = sorted(sorted(pool), key=lambda core: load[core])[:count]
            claims[owner] = sorted(chosen)
            return sorted(chosen), any(load[core] for core in chosen)

    def hold(self, owner: str, cores: Sequence[int]) -> bool:
        """Record cores chosen elsewhere (config, env); whether another owner holds one."""
        with self._locked() as claims:
            claims.pop(owner, None)
            held = {core for held_cores in claims.values() for core in held_cores}
            claims[owner] = sorted(cores)
            return bool(held & set(cores))

    def release(self, owner: str) -> None:
        with self._locked() as claims:
            claims.pop(owner, None)


def engine_pool(available: Sequence[int], reserved: int) -> list[int]:
    """The cores engines may take: ``available`` less its last ``reserved`` ones (never
    fewer than one core)."""
    cores = sorted(available)
    return cores[: max(1, len(cores) - reserved)]


def place_engine(
    *,
    num_cpus: float,
    configured: str | None,
    env: Mapping[str, str],
    reserved_cores: int,
    claims: CoreClaims,
    owner: str,
    available: Sequence[int] | None = None,
) -> CorePlacement | None:
    """Claim this replica's cores; None when the operator's env leaves binding to vLLM."""
    if configured is not None:
        cores = parse_core_list(configured)
        return CorePlacement(tuple(cores), "config", claims.hold(owner, cores))
    if BIND_ENV in env:
        value = env[BIND_ENV]
        if not re.fullmatch(CORE_LIST_PATTERN, value):
            return None  # "auto", "nobind" or per-rank lists: vLLM's business
        cores = parse_core_list(value)
        return CorePlacement(tuple(cores), "env", claims.hold(owner, cores))
    pool = engine_pool(
        available if available is not None else sorted(os.sched_getaffinity(0)), reserved_cores
    )
    count = min(len(pool), max(1, int(num_cpus)))
    cores, shared = claims.claim(owner, count, pool)
    if shared:
        logger.warning(
            "engine cores %s are shared with another engine on this node: the pool %s is "
            "used up (set resources.cpu_cores or fewer replicas per node)",
            format_core_list(cores),
            format_core_list(pool),
        )
    return CorePlacement(tuple(cores), "auto", shared)
