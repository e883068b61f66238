"""The ``llm-fleet`` command: what it prints and the exit codes its docstring promises."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from llm_fleet.cli.listen import LISTEN_ENV
from llm_fleet.cli.main import main
from llm_fleet.deployments.weights import embedded

REPO = Path(__file__).resolve().parents[2]
LOCAL_CONFIG = str(REPO / "serve_config.local.yaml")
OVERRIDES = ("LLM_ALLOWED_MODELS", "LLM_DEFAULT_MAX_TOKENS", "LLM_MAX_TOKENS_LIMIT", *LISTEN_ENV)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (*OVERRIDES, "CORS_ALLOWED_ORIGINS"):
        monkeypatch.delenv(name, raising=False)


def write_config(tmp_path: Path, applications: list[dict[str, Any]]) -> str:
    path = tmp_path / "serve_config.yaml"
    path.write_text(yaml.safe_dump({"applications": applications}))
    return str(path)


def fleet_app(*models: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": "fleet",
        "import_path": "llm_fleet.router.builder:build_app",
        "args": {"models": list(models)},
    }


def test_validate_ok_prints_one_line_per_app(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", LOCAL_CONFIG]) == 0
    out, err = capsys.readouterr()
    line, direct, listening = out.splitlines()
    assert line.startswith(f"{LOCAL_CONFIG}: applications[0] (fleet): ok, 2 model(s)")
    assert "smollm2-135m-instruct (embedded://smollm2-135m-instruct)" in line
    assert "gemma-3-270m (embedded://gemma-3-270m)" in line
    assert direct == (
        f"{LOCAL_CONFIG}: applications[1] (fleet.smollm2-135m-instruct): ok, "
        "direct path of smollm2-135m-instruct"
    )
    assert listening == f"{LOCAL_CONFIG}: llm-fleet serve listens at http://127.0.0.1:8000"
    assert err == ""


def test_validate_applies_the_allowlist(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LLM_ALLOWED_MODELS", "gemma-3-270m")
    assert main(["validate", LOCAL_CONFIG]) == 0
    out = capsys.readouterr().out
    fleet, direct, _ = out.splitlines()
    assert fleet.endswith("ok, 1 model(s): gemma-3-270m (embedded://gemma-3-270m)")
    # SmolLM2's direct app stays in the file and serves no model.
    assert direct.endswith(
        "ok, smollm2-135m-instruct is left out by LLM_ALLOWED_MODELS: this app serves no model"
    )


def test_validate_names_the_failing_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = {"name": "other", "import_path": "somewhere:app"}
    bad_scaling = {"min_replicas": 3, "max_replicas": 1}
    path = write_config(
        tmp_path,
        [
            other,
            fleet_app(
                {"id": "a", "source": "/m/a"},
                {"id": "b", "source": "/m/b", "autoscaling": bad_scaling},
            ),
        ],
    )
    assert main(["validate", path]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith(f"{path}: applications[1].args.models.1.autoscaling: ")
    assert "min_replicas must not exceed max_replicas" in err


def test_validate_reports_every_invalid_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_config(tmp_path, [fleet_app({"id": "a", "source": "ftp://x", "replicas": 2})])
    assert main(["validate", path]) == 1
    lines = capsys.readouterr().err.splitlines()
    assert any(line.startswith(f"{path}: applications[0].args.models.0.source: ") for line in lines)
    assert (
        f"{path}: applications[0].args.models.0.replicas: Extra inputs are not permitted" in lines
    )


def test_validate_unknown_allowlist_id(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LLM_ALLOWED_MODELS", "llama-70b")
    assert main(["validate", LOCAL_CONFIG]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"{LOCAL_CONFIG}: applications[0]: LLM_ALLOWED_MODELS")
    assert "llama-70b" in err
    assert "configured: gemma-3-270m, smollm2-135m-instruct" in err


def direct_app(name: str, fleet_args: dict[str, Any], model_id: str) -> dict[str, Any]:
    return {
        "name": name,
        "route_prefix": f"/m/{model_id}",
        "import_path": "llm_fleet.router.builder:build_direct_app",
        "args": {**fleet_args, "direct_model": model_id},
    }


@pytest.mark.parametrize(
    ("apps", "message"),
    [
        # a direct: true model whose app is missing
        (
            lambda f: [f],
            "applications[0]: a direct: true model needs an application named 'fleet.a'",
        ),
        # the direct app misnamed: the router would not find the replicas
        (
            lambda f: [f, direct_app("a-direct", f["args"], "a")],
            "applications[1]: the direct app of 'a' must be named 'fleet.a'",
        ),
        # direct_model names a model without direct: true (a second engine)
        (
            lambda f: [
                f,
                direct_app("fleet.a", f["args"], "a"),
                direct_app("fleet.b", f["args"], "b"),
            ],
            "applications[2].args.direct_model: model 'b' needs 'direct: true'",
        ),
        (
            lambda f: [
                f,
                direct_app("fleet.a", f["args"], "a"),
                direct_app("fleet.z", f["args"], "z"),
            ],
            "applications[2].args.direct_model: 'z' is not a configured model",
        ),
    ],
)
def test_validate_checks_the_direct_wiring(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], apps: Any, message: str
) -> None:
    fleet = fleet_app({"id": "a", "source": "/m/a", "direct": True}, {"id": "b", "source": "/m/b"})
    path = write_config(tmp_path, apps(fleet))
    assert main(["validate", path]) == 1
    err = capsys.readouterr().err
    assert f"{path}: {message}" in err, err


def test_validate_missing_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = str(tmp_path / "nope.yaml")
    assert main(["validate", missing]) == 2
    assert capsys.readouterr().err == f"{missing}: cannot read: No such file or directory\n"


def test_validate_invalid_yaml_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("applications: [\n  - name: x\n")
    assert main(["validate", str(path)]) == 2
    assert capsys.readouterr().err.startswith(f"{path}: not valid YAML:")


@pytest.mark.parametrize("text", ["", "just a string\n", "applications: []\n", "x: 1\n"])
def test_validate_without_fleet_app_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str
) -> None:
    path = tmp_path / "other.yaml"
    path.write_text(text)
    assert main(["validate", str(path)]) == 1
    err = capsys.readouterr().err
    assert err == f"{path}: no application with import_path llm_fleet.router.builder:build_app\n"


def test_validate_several_files_reports_each(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = str(tmp_path / "nope.yaml")
    assert main(["validate", LOCAL_CONFIG, missing]) == 2
    out, err = capsys.readouterr()
    assert "(fleet): ok" in out
    assert missing in err


@pytest.mark.parametrize("argv", [[], ["validate"], ["models"], ["frobnicate"]])
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    assert "usage: llm-fleet" in capsys.readouterr().err


def test_models_list_shows_store_and_state(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(embedded.MODEL_STORE_ENV, str(tmp_path))
    done = tmp_path / "gemma-3-270m"
    done.mkdir()
    marker = {"format_version": embedded.FORMAT_VERSION}
    (done / embedded.MARKER_FILE).write_text(json.dumps(marker))
    assert main(["models", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"store: {tmp_path}"
    assert lines[1].startswith("smollm2-135m-instruct\tnot prepared\t")
    assert lines[2].startswith("gemma-3-270m\tprepared\t")


def test_models_prepare_prints_the_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def fake_convert(gguf: Path, out: Path, *, add_bos: bool) -> None:
        out.mkdir(exist_ok=True)  # save_pretrained accepts an existing folder
        (out / "config.json").write_text("{}")

    monkeypatch.setenv(embedded.MODEL_STORE_ENV, str(tmp_path))
    monkeypatch.setattr(embedded, "convert_gguf", fake_convert)
    assert main(["models", "prepare", "smollm2-135m-instruct"]) == 0
    folder = tmp_path / "smollm2-135m-instruct"
    assert capsys.readouterr().out == f"smollm2-135m-instruct: {folder}\n"
    assert embedded.is_prepared(folder)


def test_models_prepare_unknown_id_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "prepare", "llama-70b"]) == 1
    err = capsys.readouterr().err
    assert "unknown embedded model 'llama-70b'" in err
    assert "gemma-3-270m, smollm2-135m-instruct" in err


def test_installed_console_script_validates_the_local_config() -> None:
    script = Path(sys.executable).parent / "llm-fleet"
    assert script.is_file(), "run 'pip install -e .' so the llm-fleet script exists"
    environ = {k: v for k, v in os.environ.items() if k not in OVERRIDES}
    result = subprocess.run(
        [str(script), "validate", "serve_config.local.yaml"],
        cwd=REPO,
        env=environ,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "serve_config.local.yaml: applications[0] (fleet): ok, 2 model(s)" in result.stdout


def model_app(name: str, model_id: str, route: str | None = None, **fields: Any) -> dict[str, Any]:
    model = {"id": model_id, "source": "embedded://smollm2-135m-instruct", **fields}
    return {
        "name": name,
        "route_prefix": route,
        "import_path": "llm_fleet.router.builder:build_model_app",
        "args": {"models": [model]},
    }


def test_validate_checks_the_model_apps(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = [fleet_app(), model_app("fleet.a", "a"), model_app("fleet.b", "b", "/m/b", direct=True)]
    assert main(["validate", write_config(tmp_path, good)]) == 0
    out = capsys.readouterr().out
    assert "applications[0] (fleet): ok, the router" in out
    assert (
        "applications[2] (fleet.b): ok, model b (embedded://smollm2-135m-instruct), direct" in out
    )
    cases = [
        ([fleet_app(), model_app("fleet.x", "a")], "the model app of 'a' must be named 'fleet.a'"),
        ([fleet_app(), model_app("fleet.a", "a", "/a")], "route_prefix must be null"),
        ([fleet_app(), model_app("fleet.b", "b", None, direct=True)], "must be /m/b"),
        ([fleet_app()], "(fleet): no models, in its args or as apps"),
    ]
    for applications, message in cases:
        assert main(["validate", write_config(tmp_path, applications)]) == 1
        assert message in capsys.readouterr().err
    two = model_app("fleet.a", "a")
    two["args"]["models"].append({"id": "c", "source": "embedded://c"})
    assert main(["validate", write_config(tmp_path, [fleet_app(), two])]) == 1
    assert "a model app holds exactly one model, got 2" in capsys.readouterr().err
