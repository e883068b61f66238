"""Weights from a Hugging Face hub mirror: the only huggingface_hub user.

huggingface_hub's own settings apply: ``HF_ENDPOINT`` (point it at the mirror, e.g.
an olah server, so the public hub is never reached), ``HF_TOKEN``, and
``HF_HUB_OFFLINE`` (then nothing is fetched, not even from the mirror: a model must
already be in the node cache).

Digests come from the mirror's tree listing: sha256 for LFS files, the git blob sha1
for plain files. A ``MANIFEST.sha256`` in the repository, if present, adds sha256s.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from deployments.errors import ModelPreparationError
from deployments.weights.cache import Progress, RemoteFile
from deployments.weights.integrity import MANIFEST_NAME, Digest, parse_manifest
from deployments.weights.sources import Source


def _reason(exc: Exception) -> str:
    # huggingface_hub's messages name URLs and status, never the token.
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def _digest(entry: Any) -> Digest | None:
    lfs = getattr(entry, "lfs", None)
    if lfs is not None:
        sha = lfs.get("sha256") if isinstance(lfs, dict) else getattr(lfs, "sha256", None)
        if sha:
            return Digest("sha256", str(sha))
    blob = getattr(entry, "blob_id", None)
    return Digest("git-sha1", str(blob)) if blob else None


class HFStore:
    """A ``WeightStore`` over one ``hf://org/name@revision`` on the configured endpoint."""

    def __init__(self, source: Source):
        from huggingface_hub import HfApi

        self._repo, self._revision = source.location, source.revision
        self._api = HfApi()
        self.description = str(source)

    def _download(self, name: str, folder: Path) -> Path:
        from huggingface_hub import hf_hub_download

        try:
            return Path(
                hf_hub_download(self._repo, name, revision=self._revision, local_dir=folder)
            )
        except Exception as exc:  # hub client errors are many types (HTTP, offline, ...)
            raise ModelPreparationError(
                f"{self.description}: downloading {name} failed: {_reason(exc)}"
            ) from None

    def list_files(self) -> list[RemoteFile]:
        try:
            entries = [
                e
                for e in self._api.list_repo_tree(
                    self._repo, recursive=True, revision=self._revision
                )
                if hasattr(e, "size")
            ]
        except Exception as exc:  # hub client errors are many types (HTTP, offline, ...)
            raise ModelPreparationError(f"{self.description}: cannot list: {_reason(exc)}") from None
        files = {e.path: RemoteFile(e.path, int(e.size), _digest(e)) for e in entries}
        if MANIFEST_NAME in files:
            with tempfile.TemporaryDirectory() as scratch:
                text = self._download(MANIFEST_NAME, Path(scratch)).read_text()
            for name, digest in parse_manifest(text).items():
                if name in files:
                    files[name] = RemoteFile(name, files[name].size, digest)
        return [f for name, f in sorted(files.items()) if not name.startswith(".")]

    def fetch(self, file: RemoteFile, dest: Path, progress: Progress) -> None:
        with tempfile.TemporaryDirectory(dir=dest.parent) as scratch:
            shutil.move(self._download(file.name, Path(scratch)), dest)
        progress.advance(file.size)
