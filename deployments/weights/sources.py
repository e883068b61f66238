"""Parsing a model's ``source`` into one of the four forms we load weights from."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Literal

from llm_fleet.deployments.errors import ConfigError

Scheme = Literal["embedded", "local", "s3", "hf"]

_HF = re.compile(r"^hf://(?P<repo>[^/@\s]+/[^/@\s]+)(?:@(?P<revision>\S+))?$")
_S3 = re.compile(r"^s3://(?P<bucket>[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9])(?:/(?P<prefix>\S*))?$")
# A 40-hex commit id pins an HF revision; anything else (main, a tag) can move.
_COMMIT = re.compile(r"^[0-9a-f]{40}$")


@dataclass(frozen=True)
class Source:
    """A parsed weight source.

    ``location`` is the embedded id, the local folder, ``bucket/prefix`` or ``org/name``;
    ``revision`` is set for ``hf://`` only.
    """

    scheme: Scheme
    location: str
    revision: str | None = None

    @property
    def pinned(self) -> bool:
        """True when the source names immutable content (an HF commit id)."""
        return self.scheme != "hf" or bool(self.revision and _COMMIT.match(self.revision))

    @property
    def bucket(self) -> str:
        return self.location.split("/", 1)[0]

    @property
    def prefix(self) -> str:
        """The S3 key prefix, without leading or trailing slash."""
        return self.location.split("/", 1)[1].strip("/") if "/" in self.location else ""

    def cache_key(self) -> str:
        """A folder name unique to the source and revision, readable by operators."""
        text = f"{self.scheme}://{self.location}@{self.revision or ''}"
        slug = re.sub(r"[^A-Za-z0-9._-]+", "--", self.location.strip("/"))[-80:]
        return f"{self.scheme}--{slug}--{hashlib.sha256(text.encode()).hexdigest()[:12]}"

    def __str__(self) -> str:
        if self.scheme == "hf":
            return (
                f"hf://{self.location}@{self.revision}"
                if self.revision
                else f"hf://{self.location}"
            )
        if self.scheme == "local":
            return self.location
        return f"{self.scheme}://{self.location}"


def parse_source(raw: str) -> Source:
    """Parse ``embedded://id``, ``s3://bucket/prefix``, ``hf://org/name@rev`` or a path."""
    if raw.startswith("embedded://"):
        return Source("embedded", raw.removeprefix("embedded://"))
    if raw.startswith("file://") or raw.startswith("/"):
        return Source("local", raw.removeprefix("file://"))
    if match := _S3.match(raw):
        return Source("s3", f"{match['bucket']}/{(match['prefix'] or '').strip('/')}".rstrip("/"))
    if match := _HF.match(raw):
        return Source("hf", match["repo"], match["revision"])
    raise ConfigError(
        f"unsupported source {raw!r}: use embedded://<id>, s3://bucket/prefix, "
        "hf://org/name@revision or an absolute path"
    )
