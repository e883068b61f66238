"""Model-side wiring: validate the app's ``args`` once, apply env overrides, and make
one Ray Serve deployment per allowed model.

The whole app (router included) is assembled by ``llm_fleet.router.builder.build_app``; this
module holds the half that knows nothing of the router.

Environment overrides, read here and only here (replicas get objects, not env):

- ``LLM_ALLOWED_MODELS``: comma-separated ids; narrows the configured models. An id
  that is not configured is a startup error.
- ``LLM_DEFAULT_MAX_TOKENS`` / ``LLM_MAX_TOKENS_LIMIT``: override every model's
  ``limits.default_max_tokens`` / ``limits.max_tokens_limit``.
- ``LLM_DEFAULT_TEMPERATURE`` / ``LLM_DEFAULT_TOP_P``: ``sampling.temperature`` /
  ``sampling.top_p`` of every model that sets none itself (a model's own value wins).
- ``LLM_MAX_CONCURRENT_REQUESTS``: replaces ``router.max_concurrent_requests``.
- ``LOG_FORMAT``: ``json`` or ``pretty``; replaces ``log_format``.
- ``CORS_ALLOWED_ORIGINS``: comma-separated origins; replaces ``router.cors_allowed_origins``.
- ``LLM_FLEET_KEYS_FILE``: absolute path of the API keys file; replaces
  ``router.keys_file`` (the same variable is the ``llm-fleet keys`` default ``--file``).
- ``LLM_FLEET_DRAIN_DIR``: absolute path of the drain folder; replaces
  ``router.drain_dir`` (``llm-fleet serve`` sets it for the cluster it starts).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from llm_fleet.deployments.config import FleetConfig, ModelConfig
from llm_fleet.deployments.errors import ConfigError

if TYPE_CHECKING:
    from ray.serve import Application

    from llm_fleet.deployments.model_deployment import EngineFactory

ENV_ALLOWED_MODELS = "LLM_ALLOWED_MODELS"
ENV_DEFAULT_MAX_TOKENS = "LLM_DEFAULT_MAX_TOKENS"
ENV_MAX_TOKENS_LIMIT = "LLM_MAX_TOKENS_LIMIT"
ENV_DEFAULT_TEMPERATURE = "LLM_DEFAULT_TEMPERATURE"
ENV_DEFAULT_TOP_P = "LLM_DEFAULT_TOP_P"
ENV_MAX_CONCURRENT_REQUESTS = "LLM_MAX_CONCURRENT_REQUESTS"
ENV_LOG_FORMAT = "LOG_FORMAT"
ENV_CORS_ALLOWED_ORIGINS = "CORS_ALLOWED_ORIGINS"
ENV_KEYS_FILE = "LLM_FLEET_KEYS_FILE"
ENV_DRAIN_DIR = "LLM_FLEET_DRAIN_DIR"
# The one key a direct app's args add to the fleet's (llm_fleet.router.builder.build_direct_app).
DIRECT_MODEL_ARG = "direct_model"


def describe_validation_error(exc: ValidationError, prefix: str = "") -> str:
    """One line per problem, each naming the failing field path (``models.1.id``)."""
    lines = []
    for error in exc.errors():
        path = ".".join(str(part) for part in error["loc"])
        where = ".".join(p for p in (prefix, path) if p) or "(top level)"
        message = str(error["msg"]).removeprefix("Value error, ")
        lines.append(f"{where}: {message}")
    return "\n".join(lines)


def _split(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


def _env_int(environ: Mapping[str, str], name: str) -> int | None:
    raw = environ.get(name, "").strip()
    if not raw:
        return None
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a positive integer, got {raw!r}") from None
    if value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {raw!r}")
    return value


def _env_float(environ: Mapping[str, str], name: str) -> float | None:
    raw = environ.get(name, "").strip()
    if not raw:
        return None
    try:
        return float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number, got {raw!r}") from None


def apply_allowlist(config: FleetConfig, allowed: str | None) -> FleetConfig:
    """Keep only the models named in ``allowed`` (None or blank keeps them all).

    A model's adapters are served with it; if ``allowed`` names some of them, only those.
    Naming an adapter without its model is an error (the adapter runs on its replicas).
    """
    if allowed is None or not allowed.strip():
        return config
    wanted = _split(allowed)
    configured = {m.id for m in config.models} | {a.id for m in config.models for a in m.adapters}
    unknown = [name for name in wanted if name not in configured]
    if unknown:
        raise ConfigError(
            f"{ENV_ALLOWED_MODELS} names models that are not configured: {', '.join(unknown)} "
            f"(configured: {', '.join(sorted(configured))})"
        )
    models = []
    for model in config.models:
        named = [a for a in model.adapters if a.id in wanted]
        if named and model.id not in wanted:
            raise ConfigError(
                f"{ENV_ALLOWED_MODELS} names adapter(s) {', '.join(a.id for a in named)} "
                f"without their model {model.id!r}: list it too"
            )
        if model.id in wanted:
            models.append(model.model_copy(update={"adapters": named or model.adapters}))
    return config.model_copy(update={"models": models})


def _each_model(
    config: FleetConfig,
    section: str,
    variables: str,
    change: Callable[[dict[str, Any]], dict[str, Any]],
) -> FleetConfig:
    """Every model's ``section`` (``limits``, ``sampling``) with ``change`` applied to its
    values and validated again; a value the section refuses names ``variables``."""
    updated = []
    for model in config.models:
        current = getattr(model, section)
        try:
            value = type(current).model_validate(change(current.model_dump()))
        except ValidationError as exc:
            raise ConfigError(
                f"{variables} for model {model.id!r}: " + describe_validation_error(exc)
            ) from None
        updated.append(model.model_copy(update={section: value}))
    return config.model_copy(update={"models": updated})


def _apply_token_env(config: FleetConfig, environ: Mapping[str, str]) -> FleetConfig:
    given = {
        field: value
        for field, name in (
            ("default_max_tokens", ENV_DEFAULT_MAX_TOKENS),
            ("max_tokens_limit", ENV_MAX_TOKENS_LIMIT),
        )
        if (value := _env_int(environ, name)) is not None
    }
    if not given:
        return config
    variables = f"{ENV_DEFAULT_MAX_TOKENS}/{ENV_MAX_TOKENS_LIMIT}"
    return _each_model(config, "limits", variables, lambda values: {**values, **given})


def _apply_sampling_env(config: FleetConfig, environ: Mapping[str, str]) -> FleetConfig:
    """The env's sampling defaults for the models that set none themselves."""
    given = {
        field: value
        for field, name in (("temperature", ENV_DEFAULT_TEMPERATURE), ("top_p", ENV_DEFAULT_TOP_P))
        if (value := _env_float(environ, name)) is not None
    }
    if not given:
        return config

    def fill(values: dict[str, Any]) -> dict[str, Any]:
        return {**values, **{k: v for k, v in given.items() if values[k] is None}}

    return _each_model(config, "sampling", f"{ENV_DEFAULT_TEMPERATURE}/{ENV_DEFAULT_TOP_P}", fill)


def load_config(args: Mapping[str, Any], environ: Mapping[str, str]) -> FleetConfig:
    """Validate ``args`` and apply the env overrides; the one place config is read."""
    try:
        config = FleetConfig.model_validate(dict(args))
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc, "args")) from None
    config = apply_allowlist(config, environ.get(ENV_ALLOWED_MODELS))
    config = _apply_token_env(config, environ)
    config = _apply_sampling_env(config, environ)
    log_format = environ.get(ENV_LOG_FORMAT, "").strip().lower()
    if log_format:
        if log_format not in ("json", "pretty"):
            raise ConfigError(f"{ENV_LOG_FORMAT} must be 'json' or 'pretty', got {log_format!r}")
        config = config.model_copy(update={"log_format": log_format})
    cap = _env_int(environ, ENV_MAX_CONCURRENT_REQUESTS)
    if cap is not None:
        router = config.router.model_copy(update={"max_concurrent_requests": cap})
        config = config.model_copy(update={"router": router})
    origins = environ.get(ENV_CORS_ALLOWED_ORIGINS)
    if origins is not None and origins.strip():
        router = config.router.model_copy(update={"cors_allowed_origins": _split(origins)})
        config = config.model_copy(update={"router": router})
    for variable, field in ((ENV_KEYS_FILE, "keys_file"), (ENV_DRAIN_DIR, "drain_dir")):
        value = environ.get(variable, "").strip()
        if value:
            try:
                router = type(config.router).model_validate(
                    {**config.router.model_dump(), field: value}
                )
            except ValidationError as exc:
                raise ConfigError(f"{variable}: " + describe_validation_error(exc)) from None
            config = config.model_copy(update={"router": router})
    return config


def logging_options(log_format: str | None) -> dict[str, Any]:
    """The Serve ``logging_config`` of an llm-fleet deployment for ``log_format`` (none:
    the app's, from the Serve config file)."""
    if log_format is None:
        return {}
    encoding = "JSON" if log_format == "json" else "TEXT"
    return {"logging_config": {"encoding": encoding, "enable_access_log": False}}


def deployment_options(model: ModelConfig, log_format: str | None = None) -> dict[str, Any]:
    """Ray Serve options of a model's deployment (named after the model id)."""
    res = model.resources
    actor: dict[str, Any] = {"num_cpus": res.num_cpus}
    if model.env:
        actor["runtime_env"] = {"env_vars": dict(model.env)}
    if res.accelerator_type:
        actor["accelerator_type"] = res.accelerator_type
    if res.custom and res.tensor_parallel_size == 1:
        actor["resources"] = dict(res.custom)
    options: dict[str, Any] = {
        "name": model.id,
        "autoscaling_config": model.autoscaling.to_serve(),
        "max_ongoing_requests": model.max_ongoing_requests,
        "max_queued_requests": model.max_queued_requests,
        "graceful_shutdown_timeout_s": model.graceful_shutdown_timeout_s,
        "health_check_period_s": model.health_check_period_s,
        "health_check_timeout_s": model.health_check_timeout_s,
        "ray_actor_options": actor,
        **logging_options(log_format),
    }
    if res.tensor_parallel_size > 1:
        # The replica actor sits in bundle 0 beside the first shard; vLLM's Ray
        # executor places one worker per GPU bundle, all packed on one node.
        # The custom resources go with bundle 0, so the group lands on nodes that have them.
        bundles: list[dict[str, float]] = [{"CPU": res.num_cpus, "GPU": 1.0, **res.custom}]
        bundles += [{"GPU": 1.0} for _ in range(res.tensor_parallel_size - 1)]
        options["placement_group_bundles"] = bundles
        options["placement_group_strategy"] = res.placement_strategy or "STRICT_PACK"
    elif res.uses_gpu:
        actor["num_gpus"] = res.num_gpus
    if res.max_replicas_per_node is not None:
        options["max_replicas_per_node"] = res.max_replicas_per_node
    affinity = model.prefix_affinity
    if affinity.enabled:
        options["request_router_config"] = {
            "request_router_class": CONSISTENT_HASH_ROUTER,
            "request_router_kwargs": {"num_fallback_replicas": affinity.fallback_replicas},
        }
    return options


# Ray Serve's request router for session stickiness: a hash ring over the replicas,
# keyed by the handle call's session id (the router sets it from the prompt's start).
CONSISTENT_HASH_ROUTER = "ray.serve.experimental.consistent_hash_router.ConsistentHashRouter"


# How many requests a direct model's replica may be refusing at once, beyond those it
# runs and queues, and how many more Serve's proxy may hold while it places a burst
# (``direct_deployment_options``).
DIRECT_REFUSAL_HEADROOM = 1024


def direct_deployment_options(model: ModelConfig, log_format: str | None = None) -> dict[str, Any]:
    """A ``direct: true`` model's Serve options.

    Its replicas are their app's HTTP ingress, so a request Serve refuses gets the
    proxy's plain-text 503, and Serve refuses any request that arrives while
    ``max_queued_requests`` others still wait to be placed (a burst, placed in
    milliseconds, counts). So Serve gets ``DIRECT_REFUSAL_HEADROOM`` more of both
    limits, and the replica's own bound (``ReplicaQueue``: run ``max_ongoing_requests``,
    queue ``max_queued_requests``) refuses the surplus at once with the OpenAI-shaped
    503 the router would send. While the model has no replica up (a restart, a scale
    from zero), up to that many requests wait at the proxy for one, bounded by
    ``http_options.request_timeout_s``; past that, Serve's own 503 remains."""
    options = deployment_options(model, log_format)
    bound = model.max_ongoing_requests + model.max_queued_requests
    options["max_ongoing_requests"] = bound + DIRECT_REFUSAL_HEADROOM
    options["max_queued_requests"] = model.max_queued_requests + DIRECT_REFUSAL_HEADROOM
    return options


def direct_app_name(fleet_app: str, model_id: str) -> str:
    """The Serve application that holds a ``direct: true`` model's replicas."""
    return f"{fleet_app}.{model_id}"


def direct_model_config(
    args: Mapping[str, Any], environ: Mapping[str, str]
) -> tuple[FleetConfig, str]:
    """The fleet config and the model id of a direct app's ``args``: the fleet's own
    ``args`` plus ``direct_model: <id>`` (a YAML merge of the fleet's args, see
    ``serve_config.local.yaml``). The model must be configured with ``direct: true``;
    one that ``LLM_ALLOWED_MODELS`` leaves out is returned too (its app serves no model)."""
    rest = dict(args)
    model_id = rest.pop(DIRECT_MODEL_ARG, None)
    if not isinstance(model_id, str) or not model_id:
        raise ConfigError(f"args.{DIRECT_MODEL_ARG}: the id of the model this app serves")
    config = load_config(rest, environ)
    model = config.model(model_id)
    if model is None:
        if any(m.get("id") == model_id for m in rest.get("models", [])):
            return config, model_id  # left out by LLM_ALLOWED_MODELS: the app serves nothing
        raise ConfigError(
            f"args.{DIRECT_MODEL_ARG}: {model_id!r} is not a configured model "
            f"(configured: {', '.join(m.id for m in config.models) or 'none'})"
        )
    if not model.direct:
        raise ConfigError(
            f"args.{DIRECT_MODEL_ARG}: model {model_id!r} needs 'direct: true' in the fleet's "
            "args, or the router would start a second engine for it"
        )
    return config, model_id


def model_app_config(
    args: Mapping[str, Any], environ: Mapping[str, str]
) -> tuple[FleetConfig, str]:
    """The config and model id of a model app's ``args``: the fleet schema with exactly one
    model (``llm_fleet.router.builder.build_model_app``). One that ``LLM_ALLOWED_MODELS``
    leaves out is returned too (the app then serves no model)."""
    listed = args.get("models")
    if not isinstance(listed, list) or len(listed) != 1 or not isinstance(listed[0], Mapping):
        count = len(listed) if isinstance(listed, list) else 0
        raise ConfigError(f"args.models: a model app holds exactly one model, got {count}")
    model_id = str(listed[0].get("id"))
    # The allowlist names the fleet's models, most of them in other apps: here it only
    # says whether this app's model is served.
    rest = {k: v for k, v in environ.items() if k != ENV_ALLOWED_MODELS}
    config = load_config(args, rest)
    allowed = environ.get(ENV_ALLOWED_MODELS, "").strip()
    if allowed:
        ours = {m.id for m in config.models} | {a.id for m in config.models for a in m.adapters}
        mine = [name for name in _split(allowed) if name in ours]
        if mine:
            config = apply_allowlist(config, ",".join(mine))
        else:
            config = config.model_copy(update={"models": []})
    return config, model_id


def bind_model(
    config: FleetConfig, model: ModelConfig, engine_factory: EngineFactory | None = None
) -> Application:
    """``model``'s deployment, bound (a vLLM engine unless ``engine_factory`` says otherwise)."""
    from ray import serve

    from llm_fleet.deployments.model_deployment import ModelDeployment

    return serve.deployment(**deployment_options(model, config.log_format))(ModelDeployment).bind(
        model,
        engine_factory,
        cpu_binding=config.cpu_binding,
        coalesce_frames=config.streaming.coalesce_frames,
    )


def build_model_apps(
    config: FleetConfig, engine_factory: EngineFactory | None = None
) -> dict[str, Application]:
    """One bound deployment per allowed model, keyed by model id. ``direct: true`` models
    are left out: their replicas belong to their own app
    (``llm_fleet.router.builder.build_direct_app``)."""
    return {
        model.id: bind_model(config, model, engine_factory)
        for model in config.models
        if not model.direct
    }
