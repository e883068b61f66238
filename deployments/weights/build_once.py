"""Make a folder once per node, atomically: the one mechanism behind the embedded
model store and the weight cache.

``build_once(root, key, is_ready, build)``:

1. ``root/key`` is returned as is when ``is_ready`` accepts it. It only ever appears
   through an atomic rename of a folder ``build`` finished, so it is never partial.
2. Otherwise ``root/.key.lock`` is taken: processes wanting the same folder (replicas
   starting together) wait on it, and the first one builds; the others then find step 1.
3. Under the lock, ``root/.key.tmp-*`` folders are what a crashed or killed earlier
   build left: they are deleted, never reused, and the build starts over.
4. ``build`` fills ``root/.key.tmp-<pid>``, which is then renamed to ``root/key``.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from filelock import FileLock

logger = logging.getLogger(__name__)


def build_once(
    root: Path, key: str, is_ready: Callable[[Path], bool], build: Callable[[Path], None]
) -> Path:
    """Return ``root/key``, running ``build`` into a temporary folder first if needed."""
    target = root / key
    if is_ready(target):
        return target
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / f".{key}.lock")):
        if is_ready(target):
            return target
        for stale in root.glob(f".{key}.tmp-*"):
            logger.warning("removing what an interrupted build left: %s", stale)
            shutil.rmtree(stale, ignore_errors=True)
        tmp = root / f".{key}.tmp-{os.getpid()}"
        tmp.mkdir()
        try:
            build(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    return target
