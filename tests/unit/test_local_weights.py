"""Local-folder sources: what ``resolve_weights`` accepts and refuses."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from llm_fleet.deployments.config import ModelConfig
from llm_fleet.deployments.errors import ModelPreparationError
from llm_fleet.deployments.weights import resolve_weights


def _model(folder: Path, **engine_args: Any) -> ModelConfig:
    return ModelConfig(id="m", source=str(folder), engine_args=engine_args)


def _folder(tmp_path: Path, *names: str) -> Path:
    (tmp_path / "config.json").write_text("{}")
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    return tmp_path


def test_a_folder_without_weights_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelPreparationError, match=r"holds no \*\.safetensors weights"):
        resolve_weights(_model(_folder(tmp_path, "tokenizer.json")))


def test_dummy_weights_need_only_the_config_and_tokenizer(tmp_path: Path) -> None:
    folder = _folder(tmp_path, "tokenizer.json")
    assert resolve_weights(_model(folder, load_format="dummy")) == folder


def test_dummy_weights_still_need_a_config(tmp_path: Path) -> None:
    with pytest.raises(ModelPreparationError, match=r"config\.json is missing"):
        resolve_weights(_model(tmp_path, load_format="dummy"))


def test_pickle_only_weights_are_refused_and_safetensors_load(tmp_path: Path) -> None:
    with pytest.raises(ModelPreparationError, match="pickle weights"):
        resolve_weights(_model(_folder(tmp_path, "pytorch_model.bin")))
    (tmp_path / "model.safetensors").write_bytes(b"x")
    assert resolve_weights(_model(tmp_path)) == tmp_path
