"""Weights from a real S3-compatible server: what an operator and a replica see.

Push, pull and verify (in process and through ``llm-fleet weights``), the checks that
stop a corrupt, unverifiable or pickle-only model, and the errors of an unreachable store.
"""

from __future__ import annotations

import hashlib
import os
import time
import uuid
from pathlib import Path

import pytest

from llm_fleet.deployments.config import ModelConfig
from llm_fleet.deployments.errors import ModelPreparationError
from llm_fleet.deployments.weights import resolve_weights
from llm_fleet.deployments.weights.cache import is_complete
from llm_fleet.deployments.weights.integrity import MANIFEST_NAME
from llm_fleet.deployments.weights.s3_store import S3Store
from llm_fleet.deployments.weights.sources import parse_source
from tests.weights.cli import error_line, llm_fleet
from tests.weights.models import model_files, write_model
from tests.weights.s3server import SECRET_ACCESS_KEY, S3Server, free_port

pytestmark = pytest.mark.timeout(60)


def push(folder: Path, url: str) -> None:
    S3Store(parse_source(url)).push(folder)


def model(url: str, **policy: bool) -> ModelConfig:
    return ModelConfig(id="tiny", source=url, **policy)


def usable_cache_folders(cache_dir: Path) -> list[Path]:
    """What a replica would load from the node cache."""
    return [p for p in cache_dir.glob("*") if is_complete(p)] if cache_dir.is_dir() else []


def test_pushed_model_loads_byte_identical_from_the_configured_endpoint(
    s3_server: S3Server, bucket: str, tiny_model: Path, cache_dir: Path
) -> None:
    url = f"s3://{bucket}/tiny/v1"
    push(tiny_model, url)

    manifest = s3_server.client().get_object(Bucket=bucket, Key=f"tiny/v1/{MANIFEST_NAME}")
    lines = manifest["Body"].read().decode().splitlines()
    expected = {
        name: hashlib.sha256(data).hexdigest() for name, data in model_files(tiny_model).items()
    }
    assert sorted(lines) == sorted(f"{digest}  {name}" for name, digest in expected.items())

    folder = resolve_weights(model(url))

    assert folder == cache_dir / parse_source(url).cache_key()
    assert is_complete(folder)
    assert model_files(folder) == model_files(tiny_model)
    # The bytes came from the server AWS_ENDPOINT_URL names, path-style.
    assert s3_server.requests("GET", f"/{bucket}/tiny/v1/model.safetensors") == 1


def test_cli_push_pull_verify_and_a_second_pull_downloads_nothing(
    s3_server: S3Server,
    bucket: str,
    tiny_model: Path,
    cache_dir: Path,
    s3_env: dict[str, str],
) -> None:
    url = f"s3://{bucket}/tiny/v1"
    weight_key = f"/{bucket}/tiny/v1/model.safetensors"

    pushed = llm_fleet(s3_env, "weights", "push", str(tiny_model), url)
    assert pushed.returncode == 0, pushed.stderr
    assert pushed.stdout.strip() == f"pushed 3 files and {MANIFEST_NAME} to {url}"

    pulled = llm_fleet(s3_env, "weights", "pull", url)
    assert pulled.returncode == 0, pulled.stderr
    folder = cache_dir / parse_source(url).cache_key()
    assert pulled.stdout.strip() == str(folder)
    assert model_files(folder) == model_files(tiny_model)

    verified = llm_fleet(s3_env, "weights", "verify", url)
    assert verified.returncode == 0, verified.stderr
    assert verified.stdout.strip() == f"{folder}: 3 files verified"

    gets, heads = s3_server.requests("GET", weight_key), s3_server.requests("HEAD", weight_key)
    assert gets >= 1
    again = llm_fleet(s3_env, "weights", "pull", url)
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() == str(folder)
    assert s3_server.requests("GET", weight_key) == gets
    assert s3_server.requests("HEAD", weight_key) == heads


def test_corrupted_object_is_refused_and_nothing_is_cached(
    s3_server: S3Server,
    bucket: str,
    tiny_model: Path,
    cache_dir: Path,
    s3_env: dict[str, str],
) -> None:
    url = f"s3://{bucket}/tiny/v1"
    push(tiny_model, url)
    size = (tiny_model / "model.safetensors").stat().st_size
    s3_server.client().put_object(
        Bucket=bucket, Key="tiny/v1/model.safetensors", Body=os.urandom(size)
    )

    with pytest.raises(ModelPreparationError) as caught:
        resolve_weights(model(url))

    assert f"checksum mismatch for {url}/model.safetensors" in str(caught.value)
    assert usable_cache_folders(cache_dir) == []
    assert not (cache_dir / parse_source(url).cache_key()).exists()

    pulled = llm_fleet(s3_env, "weights", "pull", url)
    assert pulled.returncode == 1
    error = error_line(pulled.stderr)
    assert error.startswith("llm-fleet weights: checksum mismatch for")
    assert "model.safetensors" in error


def test_missing_manifest_is_refused_unless_checksums_are_not_required(
    s3_server: S3Server, bucket: str, tiny_model: Path
) -> None:
    url = f"s3://{bucket}/tiny/v1"
    push(tiny_model, url)
    s3_server.client().delete_object(Bucket=bucket, Key=f"tiny/v1/{MANIFEST_NAME}")

    with pytest.raises(ModelPreparationError) as caught:
        resolve_weights(model(url))
    message = str(caught.value)
    assert message.startswith(f"{url}: no checksum for config.json")
    assert "require_checksums: false" in message

    folder = resolve_weights(model(url, require_checksums=False))
    assert model_files(folder) == model_files(tiny_model)


def test_pickle_only_model_needs_allow_pickle(
    s3_server: S3Server, bucket: str, tmp_path: Path
) -> None:
    source = write_model(tmp_path / "pickled", weights=("pytorch_model.bin",))
    (source / "tokenizer.json").unlink()  # config.json and the pickle only
    url = f"s3://{bucket}/pickled/v1"
    push(source, url)

    with pytest.raises(ModelPreparationError) as caught:
        resolve_weights(model(url))
    message = str(caught.value)
    assert message.startswith(f"{url} holds pickle weights (pytorch_model.bin)")
    assert "allow_pickle: true" in message
    assert s3_server.requests("GET", f"/{bucket}/pickled/v1/pytorch_model.bin") == 0

    folder = resolve_weights(model(url, allow_pickle=True))
    assert model_files(folder) == model_files(source)


def test_pickle_beside_safetensors_is_never_downloaded(
    s3_server: S3Server, bucket: str, tmp_path: Path
) -> None:
    source = write_model(tmp_path / "both", weights=("model.safetensors", "pytorch_model.bin"))
    url = f"s3://{bucket}/both/v1"
    push(source, url)

    folder = resolve_weights(model(url))

    expected = model_files(source)
    del expected["pytorch_model.bin"]
    assert model_files(folder) == expected
    assert not (folder / "pytorch_model.bin").exists()
    pickle_key = f"/{bucket}/both/v1/pytorch_model.bin"
    assert s3_server.requests("GET", pickle_key) == 0
    assert s3_server.requests("HEAD", pickle_key) == 0


def test_unreachable_store_fails_fast_naming_the_source_and_no_secret(
    s3_env: dict[str, str], monkeypatch: pytest.MonkeyPatch, cache_dir: Path
) -> None:
    closed = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", closed)
    url = "s3://llm-weights/unreachable/v1"

    started = time.monotonic()
    with pytest.raises(ModelPreparationError) as caught:
        resolve_weights(model(url))
    elapsed = time.monotonic() - started

    message = str(caught.value)
    assert elapsed < 30
    assert message.startswith(f"{url}: cannot list: EndpointConnectionError")
    assert closed in message
    assert SECRET_ACCESS_KEY not in message
    assert usable_cache_folders(cache_dir) == []

    pulled = llm_fleet({**s3_env, "AWS_ENDPOINT_URL": closed}, "weights", "pull", url)
    assert pulled.returncode == 1
    assert error_line(pulled.stderr).startswith(f"llm-fleet weights: {url}: cannot list")
    assert SECRET_ACCESS_KEY not in pulled.stderr + pulled.stdout


def test_missing_bucket_error_names_the_source_and_no_secret(s3_env: dict[str, str]) -> None:
    url = f"s3://missing-{uuid.uuid4().hex[:12]}/tiny/v1"

    with pytest.raises(ModelPreparationError) as caught:
        resolve_weights(model(url))

    message = str(caught.value)
    assert message.startswith(f"{url}: cannot list: NoSuchBucket")
    assert SECRET_ACCESS_KEY not in message


def test_verify_names_a_cached_file_modified_after_download(
    bucket: str, tiny_model: Path, s3_env: dict[str, str]
) -> None:
    url = f"s3://{bucket}/tiny/v1"
    push(tiny_model, url)
    folder = resolve_weights(model(url))
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))

    for target in (url, str(folder)):
        verified = llm_fleet(s3_env, "weights", "verify", target)
        assert verified.returncode == 1, target
        assert error_line(verified.stderr).startswith(
            "llm-fleet weights: checksum mismatch for model.safetensors"
        ), target


def test_push_to_a_missing_bucket_fails_with_one_error_line(
    tiny_model: Path, s3_env: dict[str, str]
) -> None:
    url = f"s3://missing-{uuid.uuid4().hex[:12]}/tiny/v1"

    pushed = llm_fleet(s3_env, "weights", "push", str(tiny_model), url)

    assert pushed.returncode == 1
    assert error_line(pushed.stderr).startswith(f"llm-fleet weights: {url}: push failed:")
    assert "NoSuchBucket" in pushed.stderr
    assert "Traceback" not in pushed.stderr
    assert SECRET_ACCESS_KEY not in pushed.stderr
