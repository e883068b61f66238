"""Checksums and the file-type policy applied before an engine sees any weights.

- ``MANIFEST.sha256`` beside the weights (S3 sources): ``sha256sum`` format,
  ``<hex>  <relative path>`` per line, written by ``llm-fleet weights push``.
- Digests a hub provides: sha256 of LFS files, git blob sha1 of plain files.
- Pickle formats (``*.bin``, ``*.pt``, ``*.pth``, ``*.pkl``, ``*.ckpt``) can run code
  when loaded; unless the model sets ``allow_pickle: true``, they are skipped beside
  safetensors (never downloaded) and a source with no other weights is refused.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from llm_fleet.deployments.errors import ModelPreparationError

MANIFEST_NAME = "MANIFEST.sha256"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
_BLOCK = 1 << 20

Algorithm = Literal["sha256", "git-sha1"]


@dataclass(frozen=True)
class Digest:
    algorithm: Algorithm
    value: str


def file_digest(path: Path, algorithm: Algorithm) -> str:
    """sha256 of the bytes, or git's blob sha1 (``sha1("blob <size>\\0" + bytes)``).

    The one function that hashes a file: weight checks, manifests, the embedded
    models' GGUF files and the GPU kit (``infra/gpu/build_kit.py``) all use it.
    """
    digest = hashlib.sha256() if algorithm == "sha256" else hashlib.sha1()
    if algorithm == "git-sha1":
        digest.update(f"blob {path.stat().st_size}\0".encode())
    with path.open("rb") as handle:
        while block := handle.read(_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def verify_file(path: Path, expected: Digest, name: str) -> None:
    """Raise ModelPreparationError naming ``name`` if ``path`` does not match."""
    actual = file_digest(path, expected.algorithm)
    if actual != expected.value:
        raise ModelPreparationError(
            f"checksum mismatch for {name}: {expected.algorithm} is {actual}, "
            f"expected {expected.value}"
        )


def parse_manifest(text: str) -> dict[str, Digest]:
    entries: dict[str, Digest] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        value, sep, name = line.partition("  ")
        name = name.removeprefix("*")
        if not sep or len(value) != 64 or not name:
            raise ModelPreparationError(f"{MANIFEST_NAME} line {number} is malformed: {line!r}")
        entries[name] = Digest("sha256", value.lower())
    return entries


def write_manifest(folder: Path, names: Iterable[str]) -> str:
    """The manifest text for ``names`` (paths relative to ``folder``), sorted."""
    lines = [f"{file_digest(folder / name, 'sha256')}  {name}" for name in sorted(names)]
    return "\n".join(lines) + "\n"


def is_pickle(name: str) -> bool:
    return name.lower().endswith(PICKLE_SUFFIXES)


def check_file_types(names: Iterable[str], *, allow_pickle: bool, source: str) -> None:
    """Refuse a source whose only weights are pickle files (unless allowed), and one
    with no weights at all. Pickle files beside safetensors are fine: they are skipped."""
    names = list(names)
    pickles = sorted(n for n in names if is_pickle(n))
    has_safetensors = any(n.endswith(".safetensors") for n in names)
    if pickles and not allow_pickle and not has_safetensors:
        raise ModelPreparationError(
            f"{source} holds pickle weights ({', '.join(pickles[:3])}), which can run code "
            "when loaded; only safetensors are loaded unless the model sets allow_pickle: true"
        )
    if not has_safetensors and not pickles:
        raise ModelPreparationError(f"{source} holds no *.safetensors weights")
