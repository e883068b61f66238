"""The app builder Ray Serve calls: ``import_path: llm_fleet.router.builder:build_app``.

It reads the config once (``llm_fleet.deployments.builder.load_config``: schema, allowlist and
env overrides), binds one deployment per allowed model and puts the router in front.
``build_app``'s twin for a ``direct: true`` model is ``build_direct_app``
(``import_path: llm_fleet.router.builder:build_direct_app``): that model's replicas as the ingress
of an app of their own (``router/direct.py``). ``build_model_app`` makes one model's own app,
``<fleet app>.<model id>``, which the router follows (``router/model_apps.py``): adding,
changing or removing such an app restarts that model alone.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from ray import serve
from ray.serve import Application

from llm_fleet.deployments.builder import (
    bind_model,
    build_model_apps,
    direct_deployment_options,
    direct_model_config,
    load_config,
    logging_options,
    model_app_config,
)
from llm_fleet.deployments.config import FleetConfig
from llm_fleet.deployments.model_deployment import EngineFactory

ROUTER_DEPLOYMENT = "router"
LEFT_OUT_DEPLOYMENT = "left-out"  # a direct app whose model LLM_ALLOWED_MODELS left out


def router_options(config: FleetConfig) -> dict[str, Any]:
    router = config.router
    actor: dict[str, Any] = {"num_cpus": router.num_cpus}
    if router.custom_resources:
        actor["resources"] = dict(router.custom_resources)
    options = {
        "name": ROUTER_DEPLOYMENT,
        "autoscaling_config": router.autoscaling.to_serve(),
        "max_ongoing_requests": router.max_ongoing_requests,
        "ray_actor_options": actor,
        **logging_options(config.log_format),
    }
    if router.max_replicas_per_node is not None:
        options["max_replicas_per_node"] = router.max_replicas_per_node
    return options


def build_app(args: Mapping[str, Any]) -> Application:
    """Build the whole fleet from the YAML ``args`` (see ``deployments/config.py``)."""
    return build_fleet(load_config(args, os.environ))


def build_fleet(config: FleetConfig, engine_factory: EngineFactory | None = None) -> Application:
    """The router in front of one deployment per model; ``engine_factory`` replaces vLLM
    (the router-ceiling benchmark runs the fake engine behind the real stack)."""
    from llm_fleet.router.ingress import RouterIngress

    models = build_model_apps(config, engine_factory)
    deployment = serve.deployment(**router_options(config))(RouterIngress)
    return deployment.bind(config, models)


def build_direct_app(args: Mapping[str, Any]) -> Application:
    """A ``direct: true`` model's own app from the fleet's ``args`` plus ``direct_model``.

    The app must be named ``<fleet app>.<model id>`` (``direct_app_name`` in
    ``deployments/builder.py``): the fleet's router finds the model's replicas there,
    and the replicas count API-key limits in the fleet app's limits actor.
    """
    config, model_id = direct_model_config(args, os.environ)
    return build_direct(config, model_id)


def build_direct(
    config: FleetConfig, model_id: str, engine_factory: EngineFactory | None = None
) -> Application:
    from llm_fleet.router.direct import DirectModelIngress, LeftOutIngress

    model = config.model(model_id)
    if model is None:  # LLM_ALLOWED_MODELS left it out: every model is a 404 here
        left_out = serve.deployment(name=LEFT_OUT_DEPLOYMENT, ray_actor_options={"num_cpus": 0})
        return left_out(LeftOutIngress).bind(config)
    options = direct_deployment_options(model, config.log_format)
    deployment = serve.deployment(**options)(DirectModelIngress)
    return deployment.bind(config, model_id, engine_factory)


def build_model_app(args: Mapping[str, Any]) -> Application:
    """One model's own app from ``args`` holding that one model (the fleet schema: also
    ``streaming``, ``cpu_binding``, ``log_format``, and ``router`` for a direct door's
    keys). Name it ``<fleet app>.<model id>``: the fleet's router finds it there and
    serves the model without a restart of its own (``router/model_apps.py``). With
    ``direct: true`` the replicas are also the app's HTTP ingress, ``/m/<id>/v1`` (give
    the app that ``route_prefix``); otherwise give it ``route_prefix: null``."""
    config, model_id = model_app_config(args, os.environ)
    return build_model(config, model_id)


def build_model(
    config: FleetConfig, model_id: str, engine_factory: EngineFactory | None = None
) -> Application:
    model = config.model(model_id)
    if model is None or model.direct:
        return build_direct(config, model_id, engine_factory)  # the left-out app, or direct
    return bind_model(config, model, engine_factory)
