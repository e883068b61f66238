"""Fixtures for the weight tests: one real S3 server per session, a bucket and a node
cache per test, and the AWS environment boto3 reads (in this process and in children)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from llm_fleet.deployments.weights.cache import CACHE_ENV
from tests.weights.models import write_model
from tests.weights.s3server import S3Server, start_s3_server

# Variables from the machine's own AWS setup that would steer boto3 elsewhere.
_FOREIGN_AWS = ("AWS_PROFILE", "AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN", "AWS_REGION")


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    server = start_s3_server(tmp_path_factory.mktemp("s3-server"))
    yield server
    server.stop()


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    return tmp_path / "weight-cache"


@pytest.fixture
def s3_env(s3_server: S3Server, cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Point boto3 at the test server and the weight cache at this test's folder.

    Returns the whole environment, for ``subprocess`` calls.
    """
    for name in _FOREIGN_AWS:
        monkeypatch.delenv(name, raising=False)
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv(CACHE_ENV, str(cache_dir))
    return dict(os.environ)


@pytest.fixture
def bucket(s3_server: S3Server, s3_env: dict[str, str]) -> Iterator[str]:
    """A fresh bucket for this test, deleted with its objects afterwards."""
    name = f"weights-{uuid.uuid4().hex[:16]}"
    s3_server.create_bucket(name)
    yield name
    s3_server.delete_bucket(name)


@pytest.fixture
def tiny_model(tmp_path: Path) -> Path:
    """``config.json``, ``tokenizer.json`` and a 2 MB ``model.safetensors``."""
    return write_model(tmp_path / "tiny-model")
