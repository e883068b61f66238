"""The node cache under real processes: replicas starting together download once, and
a download killed midway is never used and is replaced by the next start."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from llm_fleet.deployments.config import ModelConfig
from llm_fleet.deployments.weights import resolve_weights
from llm_fleet.deployments.weights.cache import LoadPolicy, fetch_to_cache, is_complete
from llm_fleet.deployments.weights.s3_store import S3Store
from llm_fleet.deployments.weights.sources import parse_source
from tests.weights.cli import REPO, llm_fleet
from tests.weights.models import MB, model_files, write_model
from tests.weights.s3server import S3Server

pytestmark = pytest.mark.timeout(90)

# A replica's start, held at a barrier so two processes call fetch_to_cache together.
_REPLICA = """
import sys
from llm_fleet.deployments.weights import store_for
from llm_fleet.deployments.weights.cache import LoadPolicy, fetch_to_cache
from llm_fleet.deployments.weights.sources import parse_source

source = parse_source(sys.argv[1])
store = store_for(source)
print("ready", flush=True)
sys.stdin.readline()
print(fetch_to_cache(store, source.cache_key(), LoadPolicy()), flush=True)
"""


def test_two_processes_starting_together_download_once(
    s3_server: S3Server,
    bucket: str,
    tmp_path: Path,
    cache_dir: Path,
    s3_env: dict[str, str],
) -> None:
    # Over boto3's multipart threshold (8 MB): one HEAD, then ranged GETs.
    source_folder = write_model(tmp_path / "model", weight_bytes=24 * MB)
    url = f"s3://{bucket}/shared/v1"
    source = parse_source(url)
    S3Store(source).push(source_folder)
    weight_key = f"/{bucket}/shared/v1/model.safetensors"

    # What one download costs on the server: boto3 asks HEAD once, then ranged GETs.
    fetch_to_cache(S3Store(source), source.cache_key(), LoadPolicy(), root=tmp_path / "one")
    heads_one = s3_server.requests("HEAD", weight_key)
    gets_one = s3_server.requests("GET", weight_key)
    assert heads_one == 1
    assert gets_one >= 1

    replicas = [
        subprocess.Popen(
            [sys.executable, "-c", _REPLICA, url],
            env=s3_env,
            cwd=REPO,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    for replica in replicas:
        assert replica.stdout is not None
        assert replica.stdout.readline().strip() == "ready"
    for replica in replicas:
        assert replica.stdin is not None
        replica.stdin.write("go\n")
        replica.stdin.flush()
    outputs = [replica.communicate(timeout=60) for replica in replicas]

    folder = cache_dir / source.cache_key()
    for replica, (out, err) in zip(replicas, outputs, strict=True):
        assert replica.returncode == 0, err
        assert out.strip() == str(folder)
    assert s3_server.requests("HEAD", weight_key) - heads_one == 1
    assert s3_server.requests("GET", weight_key) - gets_one == gets_one
    assert model_files(folder) == model_files(source_folder)
    assert list(cache_dir.glob(".*.tmp-*")) == []


@pytest.fixture
def big_model(tmp_path: Path, cache_dir: Path) -> Iterator[Path]:
    """A 64 MB model; removed afterwards with the cache (pytest keeps old tmp folders)."""
    yield write_model(tmp_path / "big-model", weight_bytes=64 * MB)
    shutil.rmtree(tmp_path / "big-model", ignore_errors=True)
    shutil.rmtree(cache_dir, ignore_errors=True)


def _partial_weights(cache_dir: Path, key: str) -> bool:
    """True once the weights file is partly written: boto3 writes ``<name>.<random>``
    and renames it to ``<name>`` when the object is complete."""
    return any(
        part.stat().st_size > 0
        for tmp in cache_dir.glob(f".{key}.tmp-*")
        for part in tmp.glob("model.safetensors.*")
    )


def test_download_killed_midway_is_never_used_and_the_next_start_replaces_it(
    bucket: str,
    big_model: Path,
    tmp_path: Path,
    cache_dir: Path,
    s3_env: dict[str, str],
) -> None:
    url = f"s3://{bucket}/big/v1"
    source = parse_source(url)
    key = source.cache_key()
    S3Store(source).push(big_model)

    with (tmp_path / "pull.log").open("w") as log:
        pull = subprocess.Popen(
            [str(Path(sys.executable).parent / "llm-fleet"), "weights", "pull", url],
            env=s3_env,
            cwd=REPO,
            stdout=log,
            stderr=log,
        )
        deadline = time.monotonic() + 30
        while not _partial_weights(cache_dir, key):
            assert pull.poll() is None, "the pull ended before it could be killed"
            assert time.monotonic() < deadline, "no bytes landed in 30 s"
            time.sleep(0.005)
        os.kill(pull.pid, signal.SIGKILL)
        assert pull.wait(timeout=10) == -signal.SIGKILL

    target = cache_dir / key
    assert not target.exists()
    interrupted = cache_dir / f".{key}.tmp-{pull.pid}"
    assert list(cache_dir.glob(f".{key}.tmp-*")) == [interrupted]

    folder = resolve_weights(ModelConfig(id="big", source=url))

    assert folder == target
    assert is_complete(folder)
    assert not interrupted.exists()
    assert list(cache_dir.glob(".*.tmp-*")) == []
    assert (folder / "model.safetensors").stat().st_size == 64 * MB
    verified = llm_fleet(s3_env, "weights", "verify", url)
    assert verified.returncode == 0, verified.stderr
    assert verified.stdout.strip() == f"{folder}: 3 files verified"
