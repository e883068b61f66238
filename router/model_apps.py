"""The router follows the model apps: models served from Serve applications of their own.

A model app is a Serve application named ``<fleet app>.<model id>`` with ``import_path:
llm_fleet.router.builder:build_model_app`` and that one model in its ``args``. Since Serve
redeploys every deployment of an application whose ``args`` change, one app per model is
what lets ``serve deploy`` add, change or remove a model without touching the others: the
router app's own ``args`` stay the same, so its replicas keep running too.

Each router replica's status board hands :class:`ModelAppFollower` every Serve app's status
at each poll (``router.status_poll_interval_s``). When the set of model apps or any of
their statuses changed, the follower reads the apps' deployed configs from the Serve
controller (one call), validates each model app's ``args`` exactly as its build did
(``load_config``: schema, ``LLM_ALLOWED_MODELS`` and the other env overrides of the
router's environment), and adds, updates or removes models in the router:

- a new app: its model is served from the next request on (404 before);
- a changed app (Serve redeploys that app alone): the router takes the new config
  (limits, sampling...) when it sees the app deploying;
- a removed app (gone, or ``DELETING``): new requests for it get 404 at once; requests in
  flight finish on the replicas Serve is draining.

A model listed in the router app's own ``args`` wins over an app of the same name (that
name is then its ``direct: true`` app). An app whose ``args`` no longer validate is left
as the router last saw it, with a warning; one never seen valid is not served.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ray.serve.exceptions import RayServeException

from llm_fleet.deployments.builder import direct_app_name, model_app_config
from llm_fleet.deployments.config import ModelConfig
from llm_fleet.deployments.errors import ConfigError
from llm_fleet.deployments.replica_status import GCS_ERRORS

logger = logging.getLogger(__name__)

MODEL_APP_IMPORT_PATH = "llm_fleet.router.builder:build_model_app"
GONE_STATES = frozenset({"DELETING"})


@dataclass(frozen=True)
class AppConfig:
    """What the controller holds of one deployed app's config."""

    import_path: str
    args: Mapping[str, Any]


def found_models(
    fleet_app: str,
    configs: Mapping[str, AppConfig],
    environ: Mapping[str, str],
    previous: Mapping[str, ModelConfig] | None = None,
) -> dict[str, ModelConfig]:
    """The models of the model apps of ``fleet_app`` among ``configs``, by id. An app
    whose args are invalid keeps its ``previous`` model, if it had one."""
    found: dict[str, ModelConfig] = {}
    for app_name, config in configs.items():
        if config.import_path != MODEL_APP_IMPORT_PATH or not app_name.startswith(f"{fleet_app}."):
            continue
        model_id = app_name.removeprefix(f"{fleet_app}.")
        try:
            fleet, listed_id = model_app_config(config.args, environ)
        except ConfigError as exc:
            logger.warning("model app %s: invalid args, not followed: %s", app_name, exc)
            if previous is not None and model_id in previous:
                found[model_id] = previous[model_id]
            continue
        if app_name != direct_app_name(fleet_app, listed_id):
            logger.warning(
                "model app %s holds model %r: name it %r to serve it",
                app_name,
                listed_id,
                direct_app_name(fleet_app, listed_id),
            )
            continue
        model = fleet.model(listed_id)
        if model is not None:  # None: LLM_ALLOWED_MODELS leaves it out
            found[listed_id] = model
    return found


def read_app_configs() -> dict[str, AppConfig]:
    """Every app's deployed config, from the Serve controller (apps deployed from a
    config file: ``serve run FILE``, ``serve deploy FILE``, ``llm-fleet serve FILE``)."""
    import ray
    from ray.serve.context import _get_global_client

    client = _get_global_client()
    if client is None:
        raise RayServeException("Ray Serve is not running")
    controller = client._controller
    configs = ray.get(controller.get_app_configs.remote(), timeout=30)
    return {
        name: AppConfig(import_path=schema.import_path, args=dict(schema.args or {}))
        for name, schema in configs.items()
    }


class ModelAppFollower:
    """Adds, updates and removes the router's models as the model apps come and go."""

    def __init__(
        self,
        fleet_app: str,
        own_models: set[str],
        add: Callable[[ModelConfig, str], None],
        remove: Callable[[str], None],
        environ: Mapping[str, str],
        read_configs: Callable[[], Mapping[str, AppConfig]] = read_app_configs,
    ):
        self._fleet_app, self._own = fleet_app, frozenset(own_models)
        self._add, self._remove = add, remove
        self._environ, self._read_configs = environ, read_configs
        self._followed: dict[str, ModelConfig] = {}
        self._last_seen: dict[str, str] | None = None

    @property
    def followed(self) -> dict[str, ModelConfig]:
        return dict(self._followed)

    async def follow(self, apps: Mapping[str, str]) -> None:
        """``apps``: every Serve app's status by name. Reads the configs again only when
        the model apps or their statuses changed since the last read."""
        prefix = f"{self._fleet_app}."
        candidates = {
            name: status
            for name, status in apps.items()
            if name.startswith(prefix) and name.removeprefix(prefix) not in self._own
        }
        if candidates == self._last_seen:
            return
        live = {name for name, status in candidates.items() if status not in GONE_STATES}
        try:
            configs = await asyncio.to_thread(self._read_configs) if live else {}
        except (*GCS_ERRORS, RayServeException) as exc:  # keep the models; read next poll
            logger.warning("could not read the model apps' configs from Ray Serve: %s", exc)
            return
        wanted = found_models(
            self._fleet_app,
            {name: config for name, config in configs.items() if name in live},
            self._environ,
            self._followed,
        )
        for model_id in sorted(set(self._followed) - set(wanted)):
            logger.info("model %s: its app is gone; no longer served", model_id)
            self._remove(model_id)
            del self._followed[model_id]
        complete = True
        for model_id, model in wanted.items():
            if self._followed.get(model_id) != model:
                what = "now served" if model_id not in self._followed else "config updated"
                try:
                    self._add(model, direct_app_name(self._fleet_app, model_id))
                except Exception as exc:  # noqa: BLE001 - one app must not stop the others
                    logger.warning(
                        "model %s: could not follow its app (%r); retrying", model_id, exc
                    )
                    complete = False
                    continue
                logger.info("model %s (app %s%s): %s", model_id, prefix, model_id, what)
                self._followed[model_id] = model
        if complete:  # else the next poll reads again
            self._last_seen = candidates
