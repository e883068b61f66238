"""One import root: ``llm_fleet`` (``llm_fleet/__init__.py``, pyproject's packages)."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from llm_fleet.cli import main as cli

REPO = Path(__file__).resolve().parents[2]


def test_the_wheel_installs_llm_fleet_alone(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path), str(REPO)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    [wheel] = tmp_path.glob("llm_fleet-*.whl")
    with zipfile.ZipFile(wheel) as whl:
        names = whl.namelist()
        [top_level] = [n for n in names if n.endswith(".dist-info/top_level.txt")]
        assert whl.read(top_level).decode().split() == ["llm_fleet"]
        entry_points = whl.read(top_level.replace("top_level.txt", "entry_points.txt")).decode()
    dist_info = "-".join(wheel.name.split("-")[:2]) + ".dist-info"
    assert {n.split("/", 1)[0] for n in names} == {"llm_fleet", dist_info}
    modules = (
        "router/app.py",
        "router/pipeline.py",
        "router/keys_file.py",
        "deployments/weights/embedded.py",
        "cli/main.py",
        "cli/launcher.py",
    )
    for module in modules:
        assert f"llm_fleet/{module}" in names
    assert not any("fake_engine" in n or n.startswith("tests/") for n in names)
    assert "llm-fleet = llm_fleet.cli.main:main" in entry_points


@pytest.mark.parametrize("old", ["router", "deployments.builder"])
def test_the_old_import_path_stops_with_the_new_one(old: str) -> None:
    done = subprocess.run(
        [sys.executable, "-c", f"import {old}"], cwd=REPO, capture_output=True, text=True
    )
    assert done.returncode != 0
    assert "ImportError" in done.stderr and "llm_fleet.router.builder:build_app" in done.stderr


def test_validate_names_the_new_import_path(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = yaml.safe_load((REPO / "serve_config.local.yaml").read_text())
    config["applications"][0]["import_path"] = "router.builder:build_app"
    path = tmp_path / "old.yaml"
    path.write_text(yaml.safe_dump(config))
    assert cli.main(["validate", str(path)]) == cli.EXIT_INVALID
    assert "import_path router.builder:build_app is now llm_fleet.router.builder:build_app" in (
        capsys.readouterr().err
    )
