"""The config schema (deployments/config.py) as a user meets it: through ``load_config``,
whose ConfigError names the failing field path."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from llm_fleet.deployments import config as config_module
from llm_fleet.deployments import fleet_settings
from llm_fleet.deployments.builder import load_config
from llm_fleet.deployments.config import FleetConfig, RouterConfig
from llm_fleet.deployments.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
APP_IMPORT_PATH = "llm_fleet.router.builder:build_app"


def model(model_id: str = "tiny", **fields: Any) -> dict[str, Any]:
    return {"id": model_id, "source": "embedded://smollm2-135m-instruct", **fields}


def config_error(args: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(args, {})
    return str(info.value)


def test_minimal_config_gets_documented_defaults() -> None:
    config = load_config({"models": [model()]}, {})

    (only,) = config.models
    assert only.id == "tiny"
    assert only.resources.num_gpus == 0 and not only.resources.uses_gpu
    assert only.autoscaling.min_replicas == 1 and only.autoscaling.max_replicas == 2
    assert only.limits.default_max_tokens <= only.limits.max_tokens_limit
    assert config.router.cors_allowed_origins == []
    assert config.model("tiny") is only and config.model("other") is None


def test_a_router_app_may_list_no_models_its_models_being_apps_of_their_own() -> None:
    assert load_config({}, {}).models == []
    assert load_config({"models": []}, {}).models == []


@pytest.mark.parametrize(
    ("args", "path"),
    [
        ({"models": [model()], "routr": {}}, "args.routr"),
        (
            {"models": [model(autoscaling={"max_replica": 3})]},
            "args.models.0.autoscaling.max_replica",
        ),
        (
            {"models": [model(), model("b", limits={"max_token": 1})]},
            "args.models.1.limits.max_token",
        ),
        ({"models": [model()], "router": {"cors": ["*"]}}, "args.router.cors"),
    ],
)
def test_unknown_key_is_rejected_with_its_path(args: dict[str, Any], path: str) -> None:
    assert f"{path}: Extra inputs are not permitted" in config_error(args)


def _schema_classes() -> list[type[BaseModel]]:
    """Every schema class, in both modules the schema spans."""
    modules = (config_module, fleet_settings)
    return [
        cls
        for module in modules
        for _, cls in inspect.getmembers(module, inspect.isclass)
        if issubclass(cls, BaseModel) and cls.__module__ == module.__name__
    ]


def test_every_field_of_every_schema_class_has_a_description() -> None:
    classes = _schema_classes()
    assert FleetConfig in classes and RouterConfig in classes and len(classes) >= 10
    missing = [
        f"{cls.__name__}.{name}"
        for cls in classes
        for name, field in cls.model_fields.items()
        if not (field.description or "").strip()
    ]
    assert missing == []


def test_every_schema_class_forbids_unknown_keys() -> None:
    lenient = [c.__name__ for c in _schema_classes() if c.model_config.get("extra") != "forbid"]
    assert lenient == []


def test_autoscaling_min_above_max_is_rejected() -> None:
    args = {"models": [model(), model("b", autoscaling={"min_replicas": 3, "max_replicas": 2})]}
    message = config_error(args)
    assert "args.models.1.autoscaling:" in message
    assert "min_replicas must not exceed max_replicas" in message


@pytest.mark.parametrize("initial", [0, 5])
def test_initial_replicas_outside_min_max_is_rejected(initial: int) -> None:
    scaling = {"min_replicas": 1, "max_replicas": 4, "initial_replicas": initial}
    message = config_error({"models": [model(autoscaling=scaling)]})
    assert "args.models.0.autoscaling:" in message
    assert "initial_replicas must lie between min_replicas and max_replicas" in message


def test_initial_replicas_inside_range_is_passed_to_serve() -> None:
    scaling = {"min_replicas": 1, "max_replicas": 4, "initial_replicas": 2}
    config = load_config({"models": [model(autoscaling=scaling)]}, {})
    assert config.models[0].autoscaling.to_serve()["initial_replicas"] == 2


def test_default_max_tokens_above_limit_is_rejected() -> None:
    limits = {"default_max_tokens": 512, "max_tokens_limit": 256}
    message = config_error({"models": [model(limits=limits)]})
    assert "args.models.0.limits:" in message
    assert "default_max_tokens must not exceed max_tokens_limit" in message


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("ftp://x", "source must start with one of"),
        ("models/relative", "source must start with one of"),
        ("hf://noslash", "hf:// sources look like hf://org/name@revision"),
        ("hf://org/name/extra", "hf:// sources look like hf://org/name@revision"),
        ("s3://UPPER", "s3:// sources look like s3://bucket/prefix"),
        ("s3://ab", "s3:// sources look like s3://bucket/prefix"),
    ],
)
def test_bad_source_is_rejected(source: str, expected: str) -> None:
    message = config_error({"models": [model(source=source)]})
    assert "args.models.0.source:" in message
    assert expected in message


@pytest.mark.parametrize(
    "source",
    [
        "embedded://gemma-3-270m",
        "s3://models-bucket/llama/v1",
        "hf://org/name@0123456789abcdef0123456789abcdef01234567",
        "/srv/models/llama",
        "file:///srv/models/llama",
    ],
)
def test_good_sources_are_accepted(source: str) -> None:
    assert load_config({"models": [model(source=source)]}, {}).models[0].source == source


@pytest.mark.parametrize("source", ["hf://org/name", "hf://org/name@main", "hf://org/n@v1.0"])
def test_hf_sources_need_a_pinned_commit_unless_allowed(source: str) -> None:
    with pytest.raises(ConfigError, match="pinned commit"):
        load_config({"models": [model(source=source)]}, {})
    allowed = load_config({"models": [model(source=source, allow_moving_revision=True)]}, {})
    assert allowed.models[0].allow_moving_revision


@pytest.mark.parametrize(
    ("arg", "owner"),
    [
        ("model", "source"),
        ("tensor_parallel_size", "resources.tensor_parallel_size"),
        ("served_model_name", "id"),
        ("trust_remote_code", "trust_remote_code"),
    ],
)
def test_reserved_engine_args_name_where_to_set_them(arg: str, owner: str) -> None:
    message = config_error({"models": [model(engine_args={arg: 2, "max_model_len": 512})]})
    assert "args.models.0.engine_args:" in message
    assert f"engine_args.{arg} is set by '{owner}'; set it there" in message


def test_other_engine_args_pass_through() -> None:
    config = load_config({"models": [model(engine_args={"max_model_len": 512})]}, {})
    assert config.models[0].engine_args == {"max_model_len": 512}


@pytest.mark.parametrize("second", ["tiny", "TINY"])
def test_duplicate_model_ids_are_rejected(second: str) -> None:
    message = config_error({"models": [model("tiny"), model(second)]})
    assert "args.models:" in message
    assert "is configured twice" in message


@pytest.mark.parametrize("bad_id", ["-leading-dash", "has space", "x" * 65, ""])
def test_malformed_model_id_is_rejected(bad_id: str) -> None:
    assert "args.models.0.id:" in config_error({"models": [model(bad_id)]})


def test_model_id_router_is_reserved() -> None:
    assert "reserved for the ingress deployment" in config_error({"models": [model("router")]})


def test_tensor_parallel_without_gpus_is_rejected() -> None:
    resources = {"tensor_parallel_size": 2, "num_gpus": 0}
    message = config_error({"models": [model(resources=resources)]})
    assert "args.models.0.resources:" in message
    assert "tensor_parallel_size > 1 needs num_gpus > 0" in message


def _fleet_apps(filename: str) -> list[dict[str, Any]]:
    document = yaml.safe_load((REPO / filename).read_text())
    return [app for app in document["applications"] if app.get("import_path") == APP_IMPORT_PATH]


@pytest.mark.parametrize("filename", ["serve_config.local.yaml", "serve_config.yaml"])
def test_repo_config_validates(filename: str, capsys: pytest.CaptureFixture[str]) -> None:
    from ray.serve.schema import ServeDeploySchema

    from llm_fleet.cli.main import main

    document = yaml.safe_load((REPO / filename).read_text())
    ServeDeploySchema.model_validate(document)  # Serve's own schema of the file
    assert _fleet_apps(filename), f"{filename} has no {APP_IMPORT_PATH} application"
    assert main(["validate", str(REPO / filename)]) == 0, capsys.readouterr().err


def test_production_config_serves_each_model_from_an_app_of_its_own() -> None:
    document = yaml.safe_load((REPO / "serve_config.yaml").read_text())
    (fleet,) = _fleet_apps("serve_config.yaml")
    assert load_config(fleet["args"], {}).models == []
    model_apps = [a for a in document["applications"] if a["name"] != fleet["name"]]
    assert [a["name"] for a in model_apps] == [
        "fleet.llama-3.1-8b-instruct",
        "fleet.qwen2.5-7b-instruct",
        "fleet.llama-3.3-70b-instruct",
    ]
    assert all(a["route_prefix"] is None for a in model_apps)


def test_local_config_needs_no_gpu_and_no_network() -> None:
    (app,) = _fleet_apps("serve_config.local.yaml")
    config = load_config(app["args"], {})
    assert [m.id for m in config.models] == ["smollm2-135m-instruct", "gemma-3-270m"]
    assert all(m.source == f"embedded://{m.id}" for m in config.models)
    assert not any(m.resources.uses_gpu for m in config.models)


def test_kuberay_serve_config_validates(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from ray.serve.schema import ServeDeploySchema

    from llm_fleet.cli.main import main

    service = yaml.safe_load((REPO / "infra/kuberay/rayservice.yaml").read_text())
    document = yaml.safe_load(service["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(document)
    path = tmp_path / "serve_config.yaml"
    path.write_text(yaml.safe_dump(document))
    assert main(["validate", str(path)]) == 0, capsys.readouterr().err
