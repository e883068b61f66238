"""What each node reads from its own environment: the weight cache, the model store,
the HF mirror."""

from __future__ import annotations

from pathlib import Path

import pytest

from llm_fleet.deployments.errors import ConfigError
from llm_fleet.deployments.weights.cache import CACHE_ENV, cache_root
from llm_fleet.deployments.weights.embedded import MODEL_STORE_ENV, model_store_dir
from llm_fleet.deployments.weights.hf_store import mirror_endpoint


def test_the_folders_default_under_the_users_cache() -> None:
    home = Path.home()
    assert cache_root({}) == home / ".cache" / "llm-fleet" / "weights"
    assert model_store_dir({}) == home / ".cache" / "llm-fleet" / "models"


def test_a_node_places_its_folders_itself() -> None:
    assert cache_root({CACHE_ENV: "/nvme/weights"}) == Path("/nvme/weights")
    assert model_store_dir({MODEL_STORE_ENV: "~/models"}) == Path.home() / "models"


def test_the_mirror_is_this_nodes_hf_endpoint() -> None:
    assert mirror_endpoint({"HF_ENDPOINT": " http://olah.internal:8090/ "}) == (
        "http://olah.internal:8090"
    )
    with pytest.raises(ConfigError, match="set HF_ENDPOINT"):
        mirror_endpoint({"HF_ENDPOINT": "  "})


def test_the_process_environment_is_read_when_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CACHE_ENV, "/first")
    assert cache_root() == Path("/first")
    monkeypatch.setenv(CACHE_ENV, "/second")
    assert cache_root() == Path("/second")
