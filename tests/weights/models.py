"""Tiny model folders for the weight tests: real file names, random weight bytes.

The weight files are not loadable by an engine; these tests only move and check bytes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

MB = 1 << 20
_BLOCK = 8 * MB


def write_random(path: Path, size: int) -> None:
    """``size`` bytes that differ from any other call's, cheaply: one random block
    repeated, each copy stamped with its index (``os.urandom`` is slow on a busy host)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    block = os.urandom(min(size, _BLOCK))
    with path.open("wb") as handle:
        for index, start in enumerate(range(0, size, _BLOCK)):
            stamped = index.to_bytes(8, "little") + block[8:]
            handle.write(stamped[: min(_BLOCK, size - start)])


def write_model(
    folder: Path,
    weights: Iterable[str] = ("model.safetensors",),
    weight_bytes: int = 2 * MB,
) -> Path:
    """A model folder: ``config.json``, ``tokenizer.json`` and random ``weights`` files."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(
        json.dumps({"architectures": ["LlamaForCausalLM"], "hidden_size": 64})
    )
    (folder / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {}}))
    for name in weights:
        write_random(folder / name, weight_bytes)
    return folder


def model_files(folder: Path) -> dict[str, bytes]:
    """Every file's bytes by relative path, leaving out hidden files (cache markers)."""
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.name.startswith(".")
    }
