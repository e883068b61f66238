"""hf:// sources against a real olah mirror on loopback (no Ray, no vLLM).

One olah server per module; each test publishes its own repository to it and pulls
into its own node cache (``LLM_FLEET_WEIGHT_CACHE``).
"""

from __future__ import annotations

import filecmp
import os
import time
import uuid
import zlib
from collections.abc import Iterator
from pathlib import Path

import huggingface_hub.constants
import pytest

from llm_fleet.deployments.errors import ConfigError, ModelPreparationError
from llm_fleet.deployments.weights import embedded, resolve_weights
from llm_fleet.deployments.weights.cache import (
    CACHE_ENV,
    LoadPolicy,
    fetch_to_cache,
    recorded_digests,
)
from llm_fleet.deployments.weights.hf_store import HFStore
from llm_fleet.deployments.weights.integrity import MANIFEST_NAME, file_digest, write_manifest
from llm_fleet.deployments.weights.sources import Source, parse_source
from tests.weights.cli import error_line, llm_fleet
from tests.weights.hfmirror import (
    EgressTrap,
    Mirror,
    make_mirror_repo,
    mirror_repo_path,
    start_mirror,
)
from tests.weights.models import model_files, write_model


@pytest.fixture(scope="module")
def hf_mirror(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mirror]:
    root = tmp_path_factory.mktemp("hf-mirror")
    mirror = start_mirror(root / "mirrors", root / "logs")
    yield mirror
    mirror.stop()


@pytest.fixture
def mirror_env(
    hf_mirror: Mirror, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> dict[str, str]:
    """This process talks to the mirror, into this test's node cache; returns the
    whole environment for subprocesses."""
    for name, value in hf_mirror.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "weight-cache"))
    return dict(os.environ)


@pytest.fixture
def egress_trap() -> Iterator[EgressTrap]:
    trap = EgressTrap()
    yield trap
    trap.close()


def publish(mirror: Mirror, folder: Path, lfs: tuple[str, ...] = ()) -> Source:
    """Commit ``folder`` to a new repository on the mirror; its pinned source."""
    repo_id = f"tests/model-{uuid.uuid4().hex[:12]}"
    sha = make_mirror_repo(mirror.mirrors_dir, repo_id, folder, lfs=lfs)
    return parse_source(f"hf://{repo_id}@{sha}")


def fetch(source: Source, policy: LoadPolicy | None = None) -> Path:
    return fetch_to_cache(HFStore(source), source.cache_key(), policy or LoadPolicy())


def cache_entries(env: dict[str, str]) -> list[str]:
    root = Path(env[CACHE_ENV])
    return sorted(p.name for p in root.iterdir() if not p.name.endswith(".lock"))


@pytest.mark.parametrize(
    ("lfs", "weights_digest"), [((), "git-sha1"), (("*.safetensors",), "sha256")]
)
def test_pinned_revision_lands_byte_identical(
    hf_mirror: Mirror,
    mirror_env: dict[str, str],
    tmp_path: Path,
    lfs: tuple[str, ...],
    weights_digest: str,
) -> None:
    model = write_model(tmp_path / "model")
    source = publish(hf_mirror, model, lfs)

    folder = fetch(source)

    assert model_files(folder) == model_files(model)
    # Each file was checked: a plain git file by its blob id, an LFS file by its sha256.
    checked = {name: d and d.algorithm for name, d in recorded_digests(folder).items()}
    assert checked == {
        "config.json": "git-sha1",
        "model.safetensors": weights_digest,
        "tokenizer.json": "git-sha1",
    }
    assert hf_mirror.request_count(f"GET /{source.location}/resolve/{source.revision}/") == 3


def test_second_fetch_downloads_nothing(
    hf_mirror: Mirror, mirror_env: dict[str, str], tmp_path: Path
) -> None:
    source = publish(hf_mirror, write_model(tmp_path / "model"))
    first = fetch(source)
    served = hf_mirror.request_count(f"/{source.location}/")

    assert fetch(source) == first
    assert hf_mirror.request_count(f"/{source.location}/") == served


def _tamper_loose_blob(repo: Path, blob: str) -> None:
    """Rewrite a git object in place: the mirror serves other bytes under the same id."""
    path = repo / ".git" / "objects" / blob[:2] / blob[2:]
    header, _, body = zlib.decompress(path.read_bytes()).partition(b"\0")
    changed = bytes([body[0] ^ 0xFF]) + body[1:]
    path.chmod(0o644)
    path.write_bytes(zlib.compress(header + b"\0" + changed, 0))


def _tamper_lfs_object(repo: Path) -> None:
    (obj,) = [p for p in (repo / ".git" / "lfs" / "objects").rglob("*") if p.is_file()]
    data = obj.read_bytes()
    obj.write_bytes(bytes([data[0] ^ 0xFF]) + data[1:])


@pytest.mark.parametrize("stored_as", ["plain", "lfs"])
def test_mirror_serving_other_bytes_than_listed_fails_naming_the_file(
    hf_mirror: Mirror, mirror_env: dict[str, str], tmp_path: Path, stored_as: str
) -> None:
    model = write_model(tmp_path / "model")
    source = publish(hf_mirror, model, ("*.safetensors",) if stored_as == "lfs" else ())
    repo = mirror_repo_path(hf_mirror.mirrors_dir, source.location)
    if stored_as == "lfs":
        _tamper_lfs_object(repo)
    else:
        _tamper_loose_blob(repo, file_digest(model / "model.safetensors", "git-sha1"))

    with pytest.raises(ModelPreparationError, match="checksum mismatch") as caught:
        fetch(source)

    assert f"{source}/model.safetensors" in str(caught.value)
    assert cache_entries(mirror_env) == []  # no complete folder, no partial download


def test_committed_manifest_with_a_wrong_hash_fails_naming_the_file(
    hf_mirror: Mirror, mirror_env: dict[str, str], tmp_path: Path
) -> None:
    model = write_model(tmp_path / "model")
    wrong = "0" * 64
    manifest = write_manifest(model, ["config.json", "tokenizer.json"])
    (model / MANIFEST_NAME).write_text(f"{manifest}{wrong}  model.safetensors\n")
    source = publish(hf_mirror, model)

    with pytest.raises(ModelPreparationError) as caught:
        fetch(source)

    message = str(caught.value)
    assert "checksum mismatch" in message
    assert f"{source}/model.safetensors" in message
    assert f"expected {wrong}" in message
    assert cache_entries(mirror_env) == []


def test_corrupted_cache_file_is_caught_by_weights_verify(
    hf_mirror: Mirror, mirror_env: dict[str, str], tmp_path: Path
) -> None:
    folder = fetch(publish(hf_mirror, write_model(tmp_path / "model")))
    healthy = llm_fleet(mirror_env, "weights", "verify", str(folder))
    assert healthy.returncode == 0, healthy.stderr

    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    broken = llm_fleet(mirror_env, "weights", "verify", str(folder))

    assert broken.returncode == 1
    assert "checksum mismatch for model.safetensors" in error_line(broken.stderr)


def test_pickle_only_repository_is_refused(
    hf_mirror: Mirror, mirror_env: dict[str, str], tmp_path: Path
) -> None:
    model = write_model(tmp_path / "model", weights=["pytorch_model.bin"])
    source = publish(hf_mirror, model)

    with pytest.raises(ModelPreparationError, match="allow_pickle") as caught:
        fetch(source)

    assert "pytorch_model.bin" in str(caught.value)
    assert hf_mirror.request_count(f"/{source.location}/resolve/") == 0


@pytest.mark.parametrize("missing", ["revision", "repository"])
def test_unknown_revision_or_repository_fails_fast_naming_the_source(
    hf_mirror: Mirror, mirror_env: dict[str, str], tmp_path: Path, missing: str
) -> None:
    known = publish(hf_mirror, write_model(tmp_path / "model"))
    if missing == "revision":
        source = parse_source(f"hf://{known.location}@{'0' * 40}")
    else:
        source = parse_source(f"hf://tests/no-such-model@{known.revision}")

    started = time.monotonic()
    with pytest.raises(ModelPreparationError) as caught:
        fetch(source)

    assert time.monotonic() - started < 30
    assert str(source) in str(caught.value)
    assert hf_mirror.endpoint in str(caught.value)


def test_hf_endpoint_set_after_huggingface_hub_import_is_still_used(
    hf_mirror: Mirror, mirror_env: dict[str, str], tmp_path: Path
) -> None:
    # As in a long-lived process: the library read its endpoint (at this module's
    # import) before HF_ENDPOINT named the mirror.
    assert hf_mirror.endpoint != huggingface_hub.constants.ENDPOINT
    model = write_model(tmp_path / "model")

    assert model_files(fetch(publish(hf_mirror, model))) == model_files(model)


@pytest.mark.parametrize("endpoint", [None, "https://huggingface.co", "https://hf.co/"])
def test_store_refuses_to_use_the_public_hub(
    mirror_env: dict[str, str], monkeypatch: pytest.MonkeyPatch, endpoint: str | None
) -> None:
    if endpoint is None:
        monkeypatch.delenv("HF_ENDPOINT")
    else:
        monkeypatch.setenv("HF_ENDPOINT", endpoint)

    with pytest.raises(ConfigError, match="HF_ENDPOINT"):
        HFStore(parse_source(f"hf://tests/anything@{'a' * 40}")).list_files()


def test_offline_node_loads_its_cached_copy_without_the_mirror(
    hf_mirror: Mirror, mirror_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = publish(hf_mirror, write_model(tmp_path / "model"))
    first = fetch(source)
    served = hf_mirror.request_count(f"/{source.location}/")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_ENDPOINT")

    assert fetch(source) == first
    assert hf_mirror.request_count(f"/{source.location}/") == served


def test_offline_node_without_the_revision_fails_naming_hf_hub_offline(
    hf_mirror: Mirror, mirror_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = publish(hf_mirror, write_model(tmp_path / "model"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    with pytest.raises(ModelPreparationError, match="HF_HUB_OFFLINE is set"):
        fetch(source)
    assert hf_mirror.request_count(f"/{source.location}/") == 0


def test_cli_pull_prints_the_cache_folder_and_stays_on_the_mirror(
    hf_mirror: Mirror, mirror_env: dict[str, str], tmp_path: Path, egress_trap: EgressTrap
) -> None:
    model = write_model(tmp_path / "model")
    source = publish(hf_mirror, model)

    done = llm_fleet({**mirror_env, **egress_trap.proxy_env()}, "weights", "pull", str(source))

    assert done.returncode == 0, done.stderr
    folder = Path(done.stdout.strip().splitlines()[-1])
    assert folder == Path(mirror_env[CACHE_ENV]) / source.cache_key()
    assert model_files(folder) == model_files(model)
    assert egress_trap.seen == []


def test_cli_pull_without_a_mirror_exits_2_and_contacts_nobody(
    mirror_env: dict[str, str], egress_trap: EgressTrap
) -> None:
    env = {k: v for k, v in mirror_env.items() if k != "HF_ENDPOINT"}

    started = time.monotonic()
    done = llm_fleet({**env, **egress_trap.proxy_env()}, "weights", "pull", f"hf://a/b@{'a' * 40}")

    assert done.returncode == 2
    assert "set HF_ENDPOINT" in error_line(done.stderr)
    assert egress_trap.seen == []
    assert time.monotonic() - started < 30


@pytest.mark.slow
def test_embedded_smollm2_served_by_the_mirror_lands_identical(
    hf_mirror: Mirror, mirror_env: dict[str, str]
) -> None:
    """The real model the serve tests load, through the mirror and ``resolve_weights``."""
    from llm_fleet.deployments.config import ModelConfig

    original = embedded.prepare("smollm2-135m-instruct")
    source = publish(hf_mirror, original, lfs=("*.safetensors",))
    model = ModelConfig.model_validate({"id": "smol", "source": str(source)})

    folder = resolve_weights(model)

    assert folder == Path(mirror_env[CACHE_ENV]) / source.cache_key()
    names = sorted(p.name for p in original.iterdir() if not p.name.startswith("."))
    assert "model.safetensors" in names
    assert sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) == names
    _, mismatch, errors = filecmp.cmpfiles(original, folder, names, shallow=False)
    assert (mismatch, errors) == ([], [])
