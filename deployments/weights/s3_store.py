"""Weights in S3 or any S3-compatible store (MinIO, Ceph RGW): the only boto3 user.

Everything about reaching the store comes from the standard AWS configuration that
boto3 reads, never from the YAML: ``AWS_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL_S3``),
``AWS_REGION`` / ``AWS_DEFAULT_REGION``, credentials from the environment, shared
config files or the instance role, and path-style addressing from the shared config
(``s3 = addressing_style = path``; boto3 already uses it for IP-address endpoints).

Layout: ``s3://bucket/prefix/<files>`` plus ``MANIFEST.sha256`` beside them, written
last by ``push`` so a half-pushed model is never taken for a whole one.

A failure's message quotes botocore's (one line), which names no credentials.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from llm_fleet.deployments.errors import ModelPreparationError, exception_reason
from llm_fleet.deployments.weights.cache import Progress, RemoteFile
from llm_fleet.deployments.weights.integrity import MANIFEST_NAME, parse_manifest, write_manifest
from llm_fleet.deployments.weights.sources import Source

if TYPE_CHECKING:
    from collections.abc import Callable

_MB = 1 << 20


def _client() -> Any:
    import boto3
    from botocore.config import Config

    config = Config(retries={"max_attempts": 3, "mode": "standard"}, connect_timeout=5)
    return boto3.session.Session().client("s3", config=config)


def _transfer_config() -> Any:
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(multipart_chunksize=64 * _MB, max_concurrency=8)


class S3Store:
    """A ``WeightStore`` over one ``s3://bucket/prefix``."""

    def __init__(self, source: Source, client: Any = None):
        self._bucket, self._prefix = source.bucket, source.prefix
        self._client = client if client is not None else _client()
        self.description = str(source)

    def _key(self, name: str) -> str:
        return f"{self._prefix}/{name}" if self._prefix else name

    def _objects(self) -> dict[str, int]:
        from botocore.exceptions import BotoCoreError, ClientError

        base = f"{self._prefix}/" if self._prefix else ""
        objects: dict[str, int] = {}
        try:
            pages = self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self._bucket, Prefix=base
            )
            for page in pages:
                for item in page.get("Contents", []):
                    objects[item["Key"][len(base) :]] = int(item["Size"])
        except (BotoCoreError, ClientError) as exc:
            reason = exception_reason(exc, lines=None)
            raise ModelPreparationError(f"{self.description}: cannot list: {reason}") from None
        if not objects:
            raise ModelPreparationError(f"{self.description}: no objects under this prefix")
        return objects

    def list_files(self) -> list[RemoteFile]:
        from botocore.exceptions import BotoCoreError, ClientError

        objects = self._objects()
        digests = {}
        if MANIFEST_NAME in objects:
            try:
                body = self._client.get_object(Bucket=self._bucket, Key=self._key(MANIFEST_NAME))
                digests = parse_manifest(body["Body"].read().decode())
            except (BotoCoreError, ClientError) as exc:
                reason = exception_reason(exc, lines=None)
                raise ModelPreparationError(
                    f"{self.description}: cannot read {MANIFEST_NAME}: {reason}"
                ) from None
        missing = sorted(set(digests) - set(objects))
        if missing:
            raise ModelPreparationError(
                f"{self.description}: {MANIFEST_NAME} lists {', '.join(missing[:3])}, "
                "which the store does not hold"
            )
        return [
            RemoteFile(name, size, digests.get(name))
            for name, size in sorted(objects.items())
            if name != MANIFEST_NAME
        ]

    def fetch(self, file: RemoteFile, dest: Path, progress: Progress) -> None:
        from boto3.exceptions import Boto3Error
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self._client.download_file(
                self._bucket,
                self._key(file.name),
                str(dest),
                Callback=progress.advance,
                Config=_transfer_config(),
            )
        except (BotoCoreError, ClientError, Boto3Error) as exc:
            reason = exception_reason(exc, lines=None)
            raise ModelPreparationError(
                f"{self.description}: downloading {file.name} failed: {reason}"
            ) from None

    def push(self, folder: Path, on_bytes: Callable[[int], None] | None = None) -> list[str]:
        """Upload every file under ``folder``, then the manifest; returns the names."""
        from boto3.exceptions import Boto3Error
        from botocore.exceptions import BotoCoreError, ClientError

        names = sorted(
            str(p.relative_to(folder))
            for p in folder.rglob("*")
            if p.is_file() and not p.name.startswith(".") and p.name != MANIFEST_NAME
        )
        manifest = write_manifest(folder, names)
        try:
            for name in names:
                self._client.upload_file(
                    str(folder / name), self._bucket, self._key(name),
                    Callback=on_bytes, Config=_transfer_config(),
                )  # fmt: skip
            self._client.put_object(
                Bucket=self._bucket, Key=self._key(MANIFEST_NAME), Body=manifest.encode()
            )
        except (BotoCoreError, ClientError, Boto3Error) as exc:
            # upload_file wraps a failed request in boto3's S3UploadFailedError.
            reason = exception_reason(exc, lines=None)
            raise ModelPreparationError(f"{self.description}: push failed: {reason}") from None
        return names
