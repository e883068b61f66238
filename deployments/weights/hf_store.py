"""Weights from a Hugging Face hub mirror (e.g. olah): the only huggingface_hub user.

The mirror is ``HF_ENDPOINT``, read when an ``HFStore`` is made and passed to every
call, so a process that imported huggingface_hub before the variable was set still
goes to the mirror. Without ``HF_ENDPOINT``, or with it naming the public hub
(``huggingface.co``, ``hf.co``), an ``HFStore`` refuses to start: nothing is ever
requested from the public hub. ``HF_TOKEN`` is sent to the mirror if set;
``HF_HUB_OFFLINE`` (read by huggingface_hub at import) stops all requests, so a model
must then already be in the node cache.

Requests: one tree listing (``GET /api/models/<repo>/tree/<rev>?recursive=true``),
then per file a ``HEAD`` and a ``GET`` of ``/<repo>/resolve/<rev>/<path>``.

Digests, as an olah mirror (a git repository per model) gives them in the listing:

- a file stored as a git LFS pointer (objects under ``.git/lfs/objects``): the LFS
  ``oid``, the sha256 of the bytes, as the public hub gives for its LFS files;
- a plain git file: its git blob id, ``sha1("blob <size>\\0" + bytes)`` (``git-sha1``);
- a ``MANIFEST.sha256`` committed in the repository replaces the digest of every file
  it names with its sha256 (and is itself checked by its blob id).
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from llm_fleet.deployments.errors import ConfigError, ModelPreparationError, exception_reason
from llm_fleet.deployments.weights.cache import Progress, RemoteFile
from llm_fleet.deployments.weights.integrity import (
    MANIFEST_NAME,
    Digest,
    parse_manifest,
    verify_file,
)
from llm_fleet.deployments.weights.node_settings import node_setting
from llm_fleet.deployments.weights.sources import Source

ENDPOINT_ENV = "HF_ENDPOINT"
_PUBLIC_HOSTS = ("huggingface.co", "hf.co")
# huggingface_hub's first lines of an error carry the status and the URL, never the token.
_REASON_LINES = 2


def mirror_endpoint(environ: Mapping[str, str] | None = None) -> str:
    """The mirror URL from ``HF_ENDPOINT``; ConfigError if unset or the public hub."""
    endpoint = node_setting(ENDPOINT_ENV, environ).rstrip("/")
    host = (urlsplit(endpoint).hostname or "").lower()
    if not host:
        raise ConfigError(
            f"hf:// sources are fetched from a hub mirror: set {ENDPOINT_ENV} to its URL "
            "(e.g. http://olah.internal:8090); the public hub is never contacted"
        )
    if any(host == public or host.endswith(f".{public}") for public in _PUBLIC_HOSTS):
        raise ConfigError(
            f"{ENDPOINT_ENV}={endpoint} is the public hub; hf:// sources are fetched "
            "from a mirror only"
        )
    return endpoint


def _offline(environ: Mapping[str, str] | None = None) -> bool:
    # Read per call, as huggingface_hub's own constant is frozen at its import.
    return node_setting("HF_HUB_OFFLINE", environ).lower() in {"1", "true", "yes", "on"}


def _digest(entry: Any) -> Digest | None:
    lfs = getattr(entry, "lfs", None)
    if lfs is not None:
        sha = lfs.get("sha256") if isinstance(lfs, dict) else getattr(lfs, "sha256", None)
        if sha:
            return Digest("sha256", str(sha))
    blob = getattr(entry, "blob_id", None)
    return Digest("git-sha1", str(blob)) if blob else None


class HFStore:
    """A ``WeightStore`` over one ``hf://org/name@revision`` on the ``HF_ENDPOINT`` mirror."""

    def __init__(self, source: Source):
        self._repo, self._revision = source.location, source.revision
        self.description = str(source)
        self._api: Any = None
        self._endpoint = ""

    def _connect(self) -> Any:
        """The hub client, made on first use: only a cache miss ever reaches the mirror,
        so a node with the model cached loads it offline, with no endpoint set."""
        if self._api is None:
            from huggingface_hub import HfApi

            if _offline():
                raise ModelPreparationError(
                    f"{self.description}: HF_HUB_OFFLINE is set and this revision is not in "
                    "the node cache; pull it while the mirror is reachable "
                    "(llm-fleet weights pull) or unset HF_HUB_OFFLINE"
                )
            self._endpoint = mirror_endpoint()
            self._api = HfApi(endpoint=self._endpoint)
        return self._api

    def _download(self, name: str, folder: Path) -> Path:
        from huggingface_hub import hf_hub_download

        self._connect()
        try:
            path = hf_hub_download(
                self._repo,
                name,
                revision=self._revision,
                local_dir=folder,
                endpoint=self._endpoint,
            )
        except Exception as exc:  # hub client errors are many types (HTTP, offline, ...)
            reason = exception_reason(exc, lines=_REASON_LINES)
            raise ModelPreparationError(
                f"{self.description}: downloading {name} from {self._endpoint} failed: {reason}"
            ) from exc
        return Path(path)

    def list_files(self) -> list[RemoteFile]:
        api = self._connect()  # its ConfigError / offline error pass through as they are
        try:
            entries = [
                e
                for e in api.list_repo_tree(self._repo, recursive=True, revision=self._revision)
                if hasattr(e, "size")
            ]
        except Exception as exc:  # hub client errors are many types (HTTP, offline, ...)
            reason = exception_reason(exc, lines=_REASON_LINES)
            raise ModelPreparationError(
                f"{self.description}: cannot list it on the mirror {self._endpoint} "
                f"(is the repository there at that revision?): {reason}"
            ) from exc
        files = {e.path: RemoteFile(e.path, int(e.size), _digest(e)) for e in entries}
        if MANIFEST_NAME in files:
            with tempfile.TemporaryDirectory() as scratch:
                manifest = self._download(MANIFEST_NAME, Path(scratch))
                if (listed := files[MANIFEST_NAME].digest) is not None:
                    verify_file(manifest, listed, f"{self.description}/{MANIFEST_NAME}")
                text = manifest.read_text()
            for name, digest in parse_manifest(text).items():
                if name in files:
                    files[name] = RemoteFile(name, files[name].size, digest)
        return [f for name, f in sorted(files.items()) if not name.startswith(".")]

    def fetch(self, file: RemoteFile, dest: Path, progress: Progress) -> None:
        with tempfile.TemporaryDirectory(dir=dest.parent) as scratch:
            shutil.move(self._download(file.name, Path(scratch)), dest)
        progress.advance(file.size)
