"""The app builder Ray Serve calls: ``import_path: router.builder:build_app``.

It reads the config once (``deployments.builder.load_config``: schema, allowlist and
env overrides), binds one deployment per allowed model and puts the router in front.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from ray import serve
from ray.serve import Application

from deployments.builder import build_model_apps, load_config
from deployments.config import FleetConfig
from deployments.model_deployment import EngineFactory

ROUTER_DEPLOYMENT = "router"


def router_options(config: FleetConfig) -> dict[str, Any]:
    router = config.router
    return {
        "name": ROUTER_DEPLOYMENT,
        "autoscaling_config": router.autoscaling.to_serve(),
        "max_ongoing_requests": router.max_ongoing_requests,
        "ray_actor_options": {"num_cpus": router.num_cpus},
    }


def build_app(args: Mapping[str, Any]) -> Application:
    """Build the whole fleet from the YAML ``args`` (see ``deployments/config.py``)."""
    return build_fleet(load_config(args, os.environ))


def build_fleet(config: FleetConfig, engine_factory: EngineFactory | None = None) -> Application:
    """The router in front of one deployment per model; ``engine_factory`` replaces vLLM
    (the router-ceiling benchmark runs the fake engine behind the real stack)."""
    from router.ingress import RouterIngress

    models = build_model_apps(config, engine_factory)
    deployment = serve.deployment(**router_options(config))(RouterIngress)
    return deployment.bind(config, models)
