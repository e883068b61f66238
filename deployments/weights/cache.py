"""The node-local weight cache: one verified copy per source and revision per node.

``fetch_to_cache`` is what every replica calls before its engine starts. It is
``build_once`` (``deployments/weights/build_once.py``: one builder per node under a
file lock, a temporary folder renamed into place, leftovers of a killed download
deleted, never reused) around a download in which each file is checked against its
digest as it lands, and the ``.llm-fleet-complete.json`` marker is written last.

The cache root is ``$LLM_FLEET_WEIGHT_CACHE`` or ``~/.cache/llm-fleet/weights``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from llm_fleet.deployments.errors import ModelPreparationError
from llm_fleet.deployments.weights.build_once import build_once
from llm_fleet.deployments.weights.integrity import Digest, check_file_types, is_pickle, verify_file
from llm_fleet.deployments.weights.node_settings import node_dir

logger = logging.getLogger(__name__)

CACHE_ENV = "LLM_FLEET_WEIGHT_CACHE"
COMPLETE_MARKER = ".llm-fleet-complete.json"


@dataclass(frozen=True)
class RemoteFile:
    """One file of a model in a store: its path relative to the model, size and digest."""

    name: str
    size: int
    digest: Digest | None


@dataclass(frozen=True)
class LoadPolicy:
    """What a model accepts: pickle weights, and files the store gives no checksum for."""

    allow_pickle: bool = False
    require_checksums: bool = True


class Progress:
    """Bytes done, rate and ETA, logged at most every ``interval_s`` seconds."""

    def __init__(self, label: str, total: int, interval_s: float = 5.0):
        self.label, self.total, self.done = label, total, 0
        self._start = self._last = time.monotonic()
        self._interval = interval_s

    def advance(self, count: int) -> None:
        self.done += count
        now = time.monotonic()
        if now - self._last >= self._interval or self.done >= self.total:
            self._last = now
            rate = self.done / max(now - self._start, 1e-6)
            eta = (self.total - self.done) / rate if rate > 0 else float("inf")
            logger.info(
                "%s: %.1f/%.1f MB (%.1f MB/s, ETA %.0fs)",
                self.label, self.done / 1e6, self.total / 1e6, rate / 1e6, eta,
            )  # fmt: skip


class WeightStore(Protocol):
    """A place weights come from (S3, an HF mirror); ``deployments/weights/*_store.py``."""

    description: str

    def list_files(self) -> list[RemoteFile]:
        """Every file of the model, with the digest the store vouches for (or None)."""
        ...

    def fetch(self, file: RemoteFile, dest: Path, progress: Progress) -> None:
        """Download ``file`` to ``dest``, reporting bytes to ``progress``."""
        ...


def cache_root(environ: Mapping[str, str] | None = None) -> Path:
    """This node's weight cache (``$LLM_FLEET_WEIGHT_CACHE``, read on the node)."""
    return node_dir(CACHE_ENV, "llm-fleet/weights", environ)


def is_complete(folder: Path) -> bool:
    return (folder / COMPLETE_MARKER).is_file()


def recorded_digests(folder: Path) -> dict[str, Digest | None]:
    """The digests a complete cache folder was verified against when it was made."""
    files = json.loads((folder / COMPLETE_MARKER).read_text())["files"]
    return {name: Digest(**d) if d else None for name, d in files.items()}


def _select(files: list[RemoteFile], policy: LoadPolicy, source: str) -> list[RemoteFile]:
    check_file_types((f.name for f in files), allow_pickle=policy.allow_pickle, source=source)
    wanted = [f for f in files if policy.allow_pickle or not is_pickle(f.name)]
    unverifiable = [f.name for f in wanted if f.digest is None]
    if unverifiable and policy.require_checksums:
        raise ModelPreparationError(
            f"{source}: no checksum for {', '.join(unverifiable[:3])}; the store gives none "
            "and there is no manifest entry (set require_checksums: false to load anyway)"
        )
    return wanted


ProgressFactory = Callable[[str, int], Progress]


def _download(
    store: WeightStore, files: list[RemoteFile], tmp: Path, progress_factory: ProgressFactory
) -> None:
    progress = progress_factory(store.description, sum(f.size for f in files))
    for file in files:
        dest = tmp / file.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        store.fetch(file, dest, progress)
        if file.digest is not None:
            verify_file(dest, file.digest, f"{store.description}/{file.name}")
    marker = {f.name: f.digest.__dict__ if f.digest else None for f in files}
    (tmp / COMPLETE_MARKER).write_text(json.dumps({"source": store.description, "files": marker}))


def fetch_to_cache(
    store: WeightStore,
    key: str,
    policy: LoadPolicy,
    root: Path | None = None,
    progress_factory: ProgressFactory = Progress,
) -> Path:
    """Return the verified local folder for ``store``, downloading it at most once."""

    def download(tmp: Path) -> None:
        _download(
            store, _select(store.list_files(), policy, store.description), tmp, progress_factory
        )

    return build_once(cache_root() if root is None else root, key, is_complete, download)
