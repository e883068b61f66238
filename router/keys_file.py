"""The API keys file: its schema, key hashing, and reading and writing it.

A key is ``lfk_`` plus 43 URL-safe characters (``secrets.token_urlsafe(32)``). The
file stores only its sha256, never the key itself, so a copy of the file (a backup,
a config map, a log of it) grants nothing::

    keys:
      - name: team-a            # unique
        id: 3f9c1a2b            # short random id for listings and logs; not secret
        hash: sha256:<hex>      # sha256 of the whole key
        models: ["*"]           # or a list of model ids
        rpm: 60                 # optional limits (see the KeyEntry fields)
        revoked: false
        created: 2026-11-22T19:00:00Z

Writes go to a temporary file in the same folder, then a rename, so a reader (the
router's hot reload) sees the old file or the new one, never half of one. The file
is created with mode 0600. Read-modify-write commands hold a lock file beside it, so
two operators creating keys at once both get theirs.

No FastAPI, no Ray: the router (``router/auth.py``) and the CLI both read it here.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import re
import secrets
import stat
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml
from filelock import FileLock
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from llm_fleet.deployments.builder import describe_validation_error
from llm_fleet.deployments.config import MODEL_ID_PATTERN
from llm_fleet.deployments.errors import ConfigError

KEY_PREFIX = "lfk_"
ALL_MODELS = "*"
HASH_PREFIX = "sha256:"


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    """What the file stores for ``key``: ``sha256:<hex>`` of the whole key."""
    return HASH_PREFIX + hashlib.sha256(key.encode()).hexdigest()


def key_matches(key: str, stored_hash: str) -> bool:
    """Whether ``key`` hashes to ``stored_hash``, compared in constant time."""
    return hmac.compare_digest(hash_key(key), stored_hash)


class KeyEntry(BaseModel):
    """One API key: who holds it, what it may use, and its limits."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$",
        description="Unique name of the key's holder (a team, a service).",
    )
    id: str = Field(
        pattern=r"^[0-9a-f]{8}$",
        description="Short random id shown by 'keys list' and in the access log; not secret.",
    )
    hash: str = Field(
        pattern=r"^sha256:[0-9a-f]{64}$",
        description="sha256 of the whole key; the key itself is never stored.",
    )
    models: list[str] = Field(
        default_factory=lambda: [ALL_MODELS],
        min_length=1,
        description="Model ids this key may use; ['*'] is every served model. A model the "
        "key may not use answers 404, exactly like a model that does not exist.",
    )
    rpm: int | None = Field(None, ge=1, description="Requests per minute; none: no limit.")
    tpm: int | None = Field(
        None, ge=1, description="Prompt + completion tokens per minute; none: no limit."
    )
    max_tokens: int | None = Field(
        None,
        ge=1,
        description="Cap on max_tokens for this key, below each model's own limit (the lower "
        "wins; it also lowers the default when the client sends none).",
    )
    concurrency: int | None = Field(
        None, ge=1, description="Requests this key may have in flight at once; none: no limit."
    )
    revoked: bool = Field(False, description="A revoked key no longer authenticates.")
    created: datetime = Field(description="When the key was created (UTC).")

    @field_validator("models")
    @classmethod
    def _model_ids(cls, value: list[str]) -> list[str]:
        if ALL_MODELS in value and len(value) > 1:
            raise ValueError("'*' stands alone: it already means every model")
        bad = [m for m in value if m != ALL_MODELS and not _is_model_id(m)]
        if bad:
            raise ValueError(f"not model ids: {', '.join(repr(m[:64]) for m in bad)}")
        if len(set(value)) != len(value):
            raise ValueError("a model is listed twice")
        return value


def _is_model_id(value: str) -> bool:
    return re.fullmatch(MODEL_ID_PATTERN, value) is not None


class KeysFile(BaseModel):
    """The whole keys file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    keys: list[KeyEntry] = Field(default_factory=list, description="Every key, revoked included.")

    @field_validator("keys")
    @classmethod
    def _unique(cls, value: list[KeyEntry]) -> list[KeyEntry]:
        for attribute in ("name", "id", "hash"):
            seen: set[str] = set()
            for entry in value:
                item = getattr(entry, attribute)
                if item in seen:
                    shown = f" {item!r}" if attribute != "hash" else ""
                    raise ValueError(f"two keys have the same {attribute}{shown}")
                seen.add(item)
        return value

    def find(self, name_or_id: str) -> KeyEntry | None:
        return next((k for k in self.keys if name_or_id in (k.name, k.id)), None)


def load_keys(path: str | Path) -> KeysFile:
    """Read and validate the keys file; a problem is a ConfigError naming the field path.

    Messages never quote the file's values, so they are safe to log.
    """
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or type(exc).__name__}") from None
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(exc, "problem", None) or "cannot parse"
        raise ConfigError(f"{path}: not valid YAML{where}: {problem}") from None
    try:
        return KeysFile.model_validate(document if document is not None else {})
    except ValidationError as exc:
        lines = describe_validation_error(exc).splitlines()
        raise ConfigError("\n".join(f"{path}: {line}" for line in lines)) from None


def list_keys(path: str | Path) -> list[KeyEntry]:
    return load_keys(path).keys


class _Dumper(yaml.SafeDumper):
    """Writes datetimes as plain ISO timestamps with a Z, as the file's docs show."""


def _timestamp(dumper: yaml.SafeDumper, value: datetime) -> yaml.ScalarNode:
    aware = value if value.tzinfo is not None else value.replace(tzinfo=UTC)  # naive: UTC
    text = aware.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return dumper.represent_scalar("tag:yaml.org,2002:timestamp", text)


_Dumper.add_representer(datetime, _timestamp)


def write_keys(path: str | Path, keys: KeysFile) -> None:
    """Replace the file atomically (temp file in the same folder, then rename).

    A new file is 0600; an existing one keeps its mode (an operator may have let the
    router's group read it).
    """
    target = Path(path)
    document: dict[str, Any] = {"keys": [e.model_dump(exclude_none=True) for e in keys.keys]}
    text = yaml.dump(document, Dumper=_Dumper, sort_keys=False, default_flow_style=None)
    handle, temp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(handle, "w") as out:  # mkstemp creates it 0600
            with contextlib.suppress(FileNotFoundError):
                os.fchmod(out.fileno(), stat.S_IMODE(target.stat().st_mode))
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold the lock file beside ``path``; the file system's refusals become ConfigErrors."""
    if not path.parent.is_dir():  # FileLock would create it, with whatever umask allows
        raise ConfigError(f"{path}: cannot write: folder {path.parent} does not exist")
    try:
        with FileLock(str(path.with_name(path.name + ".lock"))):
            yield
    except OSError as exc:
        raise ConfigError(f"{path}: cannot write: {exc.strerror or type(exc).__name__}") from None


def _load_or_empty(path: Path) -> KeysFile:
    return load_keys(path) if path.exists() else KeysFile()


def create_key(
    path: str | Path,
    name: str,
    models: list[str] | None = None,
    rpm: int | None = None,
    tpm: int | None = None,
    max_tokens: int | None = None,
    concurrency: int | None = None,
) -> str:
    """Add a key named ``name`` and return it: the only time the key exists in clear.

    Creates the file (mode 0600) if it is missing. A name already in the file, revoked
    or not, is a ConfigError: names stay unique so the access log's history stays clear.
    """
    target = Path(path)
    with _locked(target):
        current = _load_or_empty(target)
        if any(entry.name == name for entry in current.keys):
            raise ConfigError(f"{path}: a key named {name!r} exists already")
        taken = {entry.id for entry in current.keys}
        key_id = secrets.token_hex(4)
        while key_id in taken:
            key_id = secrets.token_hex(4)
        key = new_key()
        fields = {
            "name": name,
            "id": key_id,
            "hash": hash_key(key),
            "models": models if models is not None else [ALL_MODELS],
            "rpm": rpm,
            "tpm": tpm,
            "max_tokens": max_tokens,
            "concurrency": concurrency,
            "revoked": False,
            "created": datetime.now(UTC).replace(microsecond=0),
        }
        try:
            entry = KeyEntry.model_validate(fields)
        except ValidationError as exc:
            raise ConfigError(describe_validation_error(exc)) from None
        write_keys(target, KeysFile(keys=[*current.keys, entry]))
    return key


def revoke_key(path: str | Path, name_or_id: str) -> KeyEntry:
    """Mark the key with this name or id revoked (idempotent); returns its entry."""
    target = Path(path)
    with _locked(target):
        current = load_keys(target)
        found = current.find(name_or_id)
        if found is None:
            raise ConfigError(f"{path}: no key named or with id {name_or_id!r}")
        if found.revoked:
            return found
        revoked = found.model_copy(update={"revoked": True})
        keys = [revoked if entry is found else entry for entry in current.keys]
        write_keys(target, KeysFile(keys=keys))
    return revoked
