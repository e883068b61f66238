"""deployments/builder.py: env overrides applied once, and the Ray Serve options each
model's deployment gets (router/builder.py's router_options too). No Ray cluster."""

from __future__ import annotations

from typing import Any

import pytest

from llm_fleet.deployments.builder import (
    DIRECT_REFUSAL_HEADROOM,
    deployment_options,
    direct_app_name,
    direct_deployment_options,
    direct_model_config,
    load_config,
)
from llm_fleet.deployments.config import ModelConfig
from llm_fleet.deployments.errors import ConfigError
from llm_fleet.router.builder import router_options


def model(model_id: str, **fields: Any) -> dict[str, Any]:
    return {"id": model_id, "source": f"embedded://{model_id}", **fields}


ARGS: dict[str, Any] = {
    "models": [
        model("alpha", limits={"default_max_tokens": 64, "max_tokens_limit": 128}),
        model("beta"),
        model("gamma", limits={"default_max_tokens": 16, "max_tokens_limit": 2048}),
    ]
}


def ids(environ: dict[str, str]) -> list[str]:
    return [m.id for m in load_config(ARGS, environ).models]


@pytest.mark.parametrize(
    ("allowed", "expected"),
    [
        ("gamma,alpha", ["alpha", "gamma"]),
        (" beta ", ["beta"]),
        ("alpha,,gamma,", ["alpha", "gamma"]),
        ("", ["alpha", "beta", "gamma"]),
        ("  ", ["alpha", "beta", "gamma"]),
    ],
)
def test_allowlist_narrows_models_in_config_order(allowed: str, expected: list[str]) -> None:
    assert ids({"LLM_ALLOWED_MODELS": allowed}) == expected


def test_no_allowlist_keeps_every_model() -> None:
    assert ids({}) == ["alpha", "beta", "gamma"]


def test_allowlist_with_unknown_id_names_it_and_the_configured_ones() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(ARGS, {"LLM_ALLOWED_MODELS": "alpha,llama-70b"})
    message = str(info.value)
    assert "LLM_ALLOWED_MODELS" in message
    assert "not configured: llama-70b" in message
    assert "(configured: alpha, beta, gamma)" in message


def test_token_env_overrides_every_model() -> None:
    environ = {"LLM_DEFAULT_MAX_TOKENS": "100", "LLM_MAX_TOKENS_LIMIT": "300"}
    limits = [m.limits for m in load_config(ARGS, environ).models]
    assert [(lim.default_max_tokens, lim.max_tokens_limit) for lim in limits] == [(100, 300)] * 3


def test_one_token_env_keeps_the_other_configured_value() -> None:
    limits = [m.limits for m in load_config(ARGS, {"LLM_MAX_TOKENS_LIMIT": "1000"}).models]
    assert [(lim.default_max_tokens, lim.max_tokens_limit) for lim in limits] == [
        (64, 1000),
        (256, 1000),
        (16, 1000),
    ]


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({"LLM_DEFAULT_MAX_TOKENS": "many"}, "LLM_DEFAULT_MAX_TOKENS must be a positive integer"),
        ({"LLM_DEFAULT_MAX_TOKENS": "1.5"}, "LLM_DEFAULT_MAX_TOKENS must be a positive integer"),
        ({"LLM_MAX_TOKENS_LIMIT": "0"}, "LLM_MAX_TOKENS_LIMIT must be a positive integer"),
        ({"LLM_MAX_TOKENS_LIMIT": "-5"}, "LLM_MAX_TOKENS_LIMIT must be a positive integer"),
        (
            {"LLM_DEFAULT_MAX_TOKENS": "500", "LLM_MAX_TOKENS_LIMIT": "100"},
            "default_max_tokens must not exceed max_tokens_limit",
        ),
        # Over alpha's configured limit of 128: the error names the model.
        ({"LLM_DEFAULT_MAX_TOKENS": "200"}, "for model 'alpha'"),
    ],
)
def test_invalid_token_env_is_a_config_error(environ: dict[str, str], expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        load_config(ARGS, environ)


def test_cors_env_replaces_configured_origins() -> None:
    args = {**ARGS, "router": {"cors_allowed_origins": ["https://old.example"]}}
    environ = {"CORS_ALLOWED_ORIGINS": "https://a.example, https://b.example,"}
    config = load_config(args, environ)
    assert config.router.cors_allowed_origins == ["https://a.example", "https://b.example"]
    assert load_config(args, {}).router.cors_allowed_origins == ["https://old.example"]


def test_keys_file_env_replaces_the_configured_one() -> None:
    args = {**ARGS, "router": {"keys_file": "/etc/llm-fleet/keys.yaml"}}
    assert load_config(ARGS, {}).router.keys_file is None
    assert load_config(args, {}).router.keys_file == "/etc/llm-fleet/keys.yaml"
    assert load_config(args, {"LLM_FLEET_KEYS_FILE": " "}).router.keys_file == (
        "/etc/llm-fleet/keys.yaml"
    )
    config = load_config(args, {"LLM_FLEET_KEYS_FILE": "/srv/keys.yaml"})
    assert config.router.keys_file == "/srv/keys.yaml"
    assert config.router.max_request_bytes == load_config(args, {}).router.max_request_bytes


def test_keys_file_must_be_absolute() -> None:
    with pytest.raises(ConfigError, match=r"LLM_FLEET_KEYS_FILE: keys_file: .* absolute path"):
        load_config(ARGS, {"LLM_FLEET_KEYS_FILE": "keys.yaml"})
    with pytest.raises(
        ConfigError, match=r"args\.router\.keys_file: keys_file must be an absolute"
    ):
        load_config({**ARGS, "router": {"keys_file": "keys.yaml"}}, {})


def options_for(**fields: Any) -> dict[str, Any]:
    return deployment_options(ModelConfig.model_validate(model("m1", **fields)))


def test_deployment_options_carry_the_model_settings() -> None:
    scaling = {"min_replicas": 0, "max_replicas": 5, "target_ongoing_requests": 3}
    options = options_for(autoscaling=scaling, max_ongoing_requests=7, max_queued_requests=9)
    assert options["name"] == "m1"
    assert options["autoscaling_config"]["min_replicas"] == 0
    assert options["autoscaling_config"]["max_replicas"] == 5
    assert options["autoscaling_config"]["target_ongoing_requests"] == 3
    assert "initial_replicas" not in options["autoscaling_config"]
    assert options["max_ongoing_requests"] == 7
    assert options["max_queued_requests"] == 9


def test_cpu_model_reserves_no_gpu() -> None:
    options = options_for(resources={"num_cpus": 2})
    assert options["ray_actor_options"] == {"num_cpus": 2}
    assert "placement_group_bundles" not in options


def test_gpu_model_reserves_gpus_on_the_actor() -> None:
    options = options_for(resources={"num_gpus": 1, "accelerator_type": "H100"})
    actor = options["ray_actor_options"]
    assert actor["num_gpus"] == 1
    assert actor["accelerator_type"] == "H100"
    assert "placement_group_bundles" not in options


def test_tensor_parallel_model_reserves_packed_gpu_bundles() -> None:
    options = options_for(resources={"num_gpus": 1, "num_cpus": 4, "tensor_parallel_size": 4})
    bundles = options["placement_group_bundles"]
    assert len(bundles) == 4
    assert all(bundle["GPU"] == 1 for bundle in bundles)
    assert bundles[0]["CPU"] == 4
    assert options["placement_group_strategy"] == "STRICT_PACK"
    # The GPUs belong to the bundles; the actor asking too would double-reserve them.
    assert "num_gpus" not in options["ray_actor_options"]


def _accepted_by_serve(options: dict[str, Any]) -> None:
    """Ray Serve's own validation of the options (it runs when a deployment is made)."""
    from ray import serve

    class Replica:
        pass

    serve.deployment(**options)(Replica)


def test_custom_resources_and_a_per_node_cap_reach_serve() -> None:
    options = options_for(
        resources={"num_cpus": 1, "custom": {"llm": 1}, "max_replicas_per_node": 1}
    )
    assert options["ray_actor_options"] == {"num_cpus": 1, "resources": {"llm": 1}}
    assert options["max_replicas_per_node"] == 1
    _accepted_by_serve(options)


def test_tensor_parallel_custom_resources_go_with_bundle_zero() -> None:
    options = options_for(
        resources={
            "num_gpus": 1,
            "tensor_parallel_size": 2,
            "custom": {"a100-pool": 1},
            "placement_strategy": "PACK",
        }
    )
    assert options["placement_group_bundles"] == [
        {"CPU": 1.0, "GPU": 1.0, "a100-pool": 1},
        {"GPU": 1.0},
    ]
    assert options["placement_group_strategy"] == "PACK"
    assert "resources" not in options["ray_actor_options"]
    assert "max_replicas_per_node" not in options
    _accepted_by_serve(options)


@pytest.mark.parametrize(
    ("resources", "message"),
    [
        ({"custom": {"CPU": 1}}, "one of Ray's own"),
        ({"custom": {"accelerator_type:H100": 1}}, "one of Ray's own"),
        ({"custom": {"llm": 0}}, "must be > 0"),
        ({"custom": {"bad name": 1}}, "not a valid Ray resource name"),
        ({"max_replicas_per_node": 0}, "greater than or equal to 1"),
        ({"max_replicas_per_node": 101}, "less than or equal to 100"),
        (
            {"num_gpus": 1, "tensor_parallel_size": 2, "max_replicas_per_node": 1},
            "cannot be combined with tensor_parallel_size",
        ),
        ({"placement_strategy": "SPREAD"}, "set max_replicas_per_node"),
        ({"num_gpus": 1, "tensor_parallel_size": 2, "placement_strategy": "X"}, "PACK"),
    ],
)
def test_placement_settings_are_validated(resources: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config({"models": [model("alpha", resources=resources)]}, {})


def test_model_env_goes_into_the_replica_runtime_env() -> None:
    options = options_for(env={"VLLM_CPU_KVCACHE_SPACE": "2"})
    assert options["ray_actor_options"]["runtime_env"] == {
        "env_vars": {"VLLM_CPU_KVCACHE_SPACE": "2"}
    }
    assert "runtime_env" not in options_for()["ray_actor_options"]


def test_router_options() -> None:
    args = {
        **ARGS,
        "router": {
            "num_cpus": 0.25,
            "max_ongoing_requests": 50,
            "autoscaling": {"min_replicas": 2, "max_replicas": 3},
        },
    }
    options = router_options(load_config(args, {}))
    assert options["name"] == "router"
    assert options["max_ongoing_requests"] == 50
    assert options["ray_actor_options"] == {"num_cpus": 0.25}
    assert options["autoscaling_config"]["min_replicas"] == 2
    assert options["autoscaling_config"]["max_replicas"] == 3


def test_router_defaults_scale_wide() -> None:
    options = router_options(load_config(ARGS, {}))
    assert options["autoscaling_config"]["max_replicas"] == 4
    assert options["autoscaling_config"]["target_ongoing_requests"] == 200


DIRECT_ARGS: dict[str, Any] = {"models": [model("alpha", direct=True), model("beta")]}


def test_direct_models_get_no_deployment_in_the_fleet_app() -> None:
    from llm_fleet.deployments.builder import build_model_apps

    apps = build_model_apps(load_config(DIRECT_ARGS, {}))
    assert list(apps) == ["beta"]  # alpha's replicas are its direct app's ingress


def test_direct_app_args_are_the_fleet_args_plus_the_model() -> None:
    config, model_id = direct_model_config({**DIRECT_ARGS, "direct_model": "alpha"}, {})
    assert model_id == "alpha" and [m.id for m in config.models] == ["alpha", "beta"]
    assert direct_app_name("fleet", "alpha") == "fleet.alpha"


@pytest.mark.parametrize(
    ("extra", "environ", "expected"),
    [
        ({}, {}, "args.direct_model: the id of the model this app serves"),
        ({"direct_model": "beta"}, {}, "model 'beta' needs 'direct: true'"),
        ({"direct_model": "zeta"}, {}, "'zeta' is not a configured model"),
        ({"direct_model": "alpha"}, {"LLM_ALLOWED_MODELS": "nope"}, "LLM_ALLOWED_MODELS"),
    ],
)
def test_direct_app_args_errors(
    extra: dict[str, Any], environ: dict[str, str], expected: str
) -> None:
    with pytest.raises(ConfigError) as info:
        direct_model_config({**DIRECT_ARGS, **extra}, environ)
    assert expected in str(info.value)


def test_direct_model_left_out_by_the_allowlist_serves_nothing() -> None:
    config, model_id = direct_model_config(
        {**DIRECT_ARGS, "direct_model": "alpha"}, {"LLM_ALLOWED_MODELS": "beta"}
    )
    assert model_id == "alpha" and config.model("alpha") is None


def test_fleet_app_of_a_direct_app() -> None:
    from llm_fleet.router.direct import fleet_app_of

    assert fleet_app_of("fleet.alpha", "alpha") == "fleet"
    assert fleet_app_of("prod.eu.llama-3.1-8b", "llama-3.1-8b") == "prod.eu"
    for wrong in ("alpha", "fleet-alpha", ".alpha"):
        with pytest.raises(ConfigError, match=r"name it '<fleet app>\.alpha'"):
            fleet_app_of(wrong, "alpha")


def test_a_direct_models_replica_takes_more_than_it_runs_and_queues() -> None:
    """Serve must hand a direct replica its surplus, which the replica refuses in the
    OpenAI shape (``ReplicaQueue``), before Serve's proxy would answer plain text."""
    config = ModelConfig.model_validate(
        model("m1", max_ongoing_requests=7, max_queued_requests=9, direct=True)
    )
    options = direct_deployment_options(config)
    assert options["max_ongoing_requests"] == 7 + 9 + DIRECT_REFUSAL_HEADROOM
    assert options["max_queued_requests"] == 9 + DIRECT_REFUSAL_HEADROOM
    limits = ("max_ongoing_requests", "max_queued_requests")
    assert {k: v for k, v in options.items() if k not in limits} == {
        k: v for k, v in deployment_options(config).items() if k not in limits
    }


def test_sampling_defaults_from_the_env_fill_models_that_set_none() -> None:
    args = {
        "models": [model("own", sampling={"temperature": 0.2}), model("plain")],
    }
    environ = {"LLM_DEFAULT_TEMPERATURE": "0.7", "LLM_DEFAULT_TOP_P": " 0.9 "}
    config = load_config(args, environ)
    sampling = {m.id: (m.sampling.temperature, m.sampling.top_p) for m in config.models}
    assert sampling == {"own": (0.2, 0.9), "plain": (0.7, 0.9)}
    unset = load_config(args, {})
    assert [(m.sampling.temperature, m.sampling.top_p) for m in unset.models] == [
        (0.2, None),
        (None, None),
    ]


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"LLM_DEFAULT_TEMPERATURE": "warm"}, "LLM_DEFAULT_TEMPERATURE must be a number"),
        ({"LLM_DEFAULT_TEMPERATURE": "3"}, "LLM_DEFAULT_TEMPERATURE/LLM_DEFAULT_TOP_P"),
        ({"LLM_DEFAULT_TOP_P": "0"}, "top_p"),
    ],
)
def test_bad_sampling_defaults_are_startup_errors(environ: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(ARGS, environ)


def test_llm_max_concurrent_requests_sets_the_gateway_wide_cap() -> None:
    assert load_config(ARGS, {}).router.max_concurrent_requests is None
    config = load_config(ARGS, {"LLM_MAX_CONCURRENT_REQUESTS": "10"})
    assert config.router.max_concurrent_requests == 10
    with pytest.raises(ConfigError, match="LLM_MAX_CONCURRENT_REQUESTS must be a positive"):
        load_config(ARGS, {"LLM_MAX_CONCURRENT_REQUESTS": "0"})


@pytest.mark.parametrize(("value", "encoding"), [("json", "JSON"), (" Pretty ", "TEXT")])
def test_log_format_sets_every_deployments_serve_logging(value: str, encoding: str) -> None:
    config = load_config(
        {**ARGS, "models": [*ARGS["models"], model("delta", direct=True)]}, {"LOG_FORMAT": value}
    )
    expected = {"encoding": encoding, "enable_access_log": False}
    assert router_options(config)["logging_config"] == expected
    for each in config.models:
        assert deployment_options(each, config.log_format)["logging_config"] == expected
    direct = config.model("delta")
    assert direct is not None
    assert direct_deployment_options(direct, config.log_format)["logging_config"] == expected


def test_without_log_format_the_config_files_logging_config_decides() -> None:
    config = load_config(ARGS, {})
    assert config.log_format is None
    assert "logging_config" not in router_options(config)
    assert "logging_config" not in deployment_options(config.models[0], config.log_format)
    from_args = load_config({**ARGS, "log_format": "json"}, {})
    assert router_options(from_args)["logging_config"]["encoding"] == "JSON"
    with pytest.raises(ConfigError, match="LOG_FORMAT must be 'json' or 'pretty'"):
        load_config(ARGS, {"LOG_FORMAT": "xml"})


def test_router_placement_reaches_serve() -> None:
    config = load_config(
        {
            "router": {"custom_resources": {"gateway": 0.1}, "max_replicas_per_node": 1},
            "models": [model("alpha")],
        },
        {},
    )
    options = router_options(config)
    assert options["ray_actor_options"] == {"num_cpus": 0.5, "resources": {"gateway": 0.1}}
    assert options["max_replicas_per_node"] == 1
    _accepted_by_serve(options)
    with pytest.raises(ConfigError, match=r"router.custom_resources: .*one of Ray's own"):
        load_config({"router": {"custom_resources": {"GPU": 1}}, "models": [model("a")]}, {})


def test_prefix_affinity_uses_serves_consistent_hash_router() -> None:
    options = options_for(prefix_affinity={"enabled": True, "fallback_replicas": 1})
    assert options["request_router_config"] == {
        "request_router_class": (
            "ray.serve.experimental.consistent_hash_router.ConsistentHashRouter"
        ),
        "request_router_kwargs": {"num_fallback_replicas": 1},
    }
    _accepted_by_serve(options)
    assert "request_router_config" not in options_for()
