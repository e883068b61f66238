"""The ``llm-fleet`` command: validate Serve config files, prepare the embedded models.

::

    llm-fleet validate FILE [FILE...]   check every llm-fleet app's args (and direct apps)
    llm-fleet models prepare [ID...]    convert embedded models (all by default)
    llm-fleet models list               embedded ids, whether each is prepared, the store
    llm-fleet weights push|pull|verify  stage weights in S3, pre-warm or check the cache
    llm-fleet keys create|list|revoke   API keys (``--file``, default $LLM_FLEET_KEYS_FILE)
    llm-fleet serve FILE                validate FILE, then ``serve run FILE`` until Ctrl-C

``validate`` applies the same env overrides as a deployment (``LLM_ALLOWED_MODELS``...),
and those of where ``llm-fleet serve`` listens (``listen.py``: ``LLM_INFERENCE_PORT``,
``SERVER_SSL_ENABLED``...), whose TLS files it loads.
It also checks the direct path's wiring: each ``direct: true`` model has an app with
``import_path: llm_fleet.router.builder:build_direct_app``, named ``<fleet app>.<model id>``, whose
``direct_model`` is that model (README, Direct path); and the model apps
(``import_path: llm_fleet.router.builder:build_model_app``, one model each): each named
``<fleet app>.<model id>``, with ``route_prefix: null`` unless ``direct: true`` (then
``/m/<id>``), every fleet app serving at least one model (README, Running on a cluster).

Exit codes: 0 ok; 1 invalid config (a TLS file that does not load among them), no
llm-fleet application in a file, or a model that failed to prepare; 2 usage error, or a
file that cannot be read or parsed as YAML.
``keys``: 0 ok, 2 usage or an invalid keys file, an unknown or duplicate key name.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml

from llm_fleet.cli.listen import resolve as resolve_listen
from llm_fleet.deployments.builder import (
    ENV_KEYS_FILE,
    direct_app_name,
    direct_model_config,
    load_config,
    model_app_config,
)
from llm_fleet.deployments.config import FleetConfig
from llm_fleet.deployments.errors import ConfigError, ModelPreparationError
from llm_fleet.deployments.weights import embedded
from llm_fleet.deployments.weights.commands import add_parser as add_weights_commands
from llm_fleet.router import keys_file as keys

APP_IMPORT_PATH = "llm_fleet.router.builder:build_app"
DIRECT_IMPORT_PATH = "llm_fleet.router.builder:build_direct_app"
MODEL_APP_IMPORT_PATH = "llm_fleet.router.builder:build_model_app"
EXIT_OK, EXIT_INVALID, EXIT_USAGE = 0, 1, 2
Handler = Callable[[argparse.Namespace], int]


def _error(message: str) -> None:
    print(message, file=sys.stderr)


def _with_prefix(where: str, line: str) -> str:
    # load_config's schema errors start with the field path ("args.models.1..."),
    # env override errors with the variable name.
    return f"{where}.{line}" if line.startswith("args") else f"{where}: {line}"


def _app_args(where: str, app: Mapping[str, object]) -> Mapping[str, Any] | None:
    args = app.get("args") or {}
    if not isinstance(args, Mapping):
        _error(f"{where}.args: must be a mapping, got {type(args).__name__}")
        return None
    return args


def _config_errors(where: str, exc: ConfigError) -> int:
    for line in str(exc).splitlines():
        _error(_with_prefix(where, line))
    return EXIT_INVALID


def _validate_app(where: str, app: Mapping[str, object], direct_apps: set[str]) -> int:
    args = _app_args(where, app)
    if args is None:
        return EXIT_INVALID
    try:
        config = load_config(args, os.environ)
    except ConfigError as exc:
        return _config_errors(where, exc)
    name = str(app.get("name", "default"))
    wanted = {direct_app_name(name, m.id) for m in config.models if m.direct}
    for app_name in sorted(wanted - direct_apps):
        _error(
            f"{where}: a direct: true model needs an application named {app_name!r} "
            f"with import_path {DIRECT_IMPORT_PATH}"
        )
    if not wanted <= direct_apps:
        return EXIT_INVALID
    models = ", ".join(f"{m.id} ({m.source})" for m in config.models)
    own = f"{len(config.models)} model(s): {models}" if config.models else "the router"
    print(f"{where} ({name}): ok, {own}")
    return EXIT_OK


def _one_model_app(
    where: str,
    app: Mapping[str, object],
    fleet_names: set[str],
    read: Callable[[Mapping[str, Any], Mapping[str, str]], tuple[FleetConfig, str]],
    kind: str,
) -> tuple[FleetConfig, str, str] | int:
    """An app serving one model (a direct or a model app): its config read by ``read``,
    its model id and its name, which must be ``<fleet>.<id>``; or the exit code of the
    errors printed."""
    args = _app_args(where, app)
    if args is None:
        return EXIT_INVALID
    try:
        config, model_id = read(args, os.environ)
    except ConfigError as exc:
        return _config_errors(where, exc)
    name = str(app.get("name", "default"))
    if name not in {direct_app_name(fleet, model_id) for fleet in fleet_names}:
        expected = " or ".join(repr(direct_app_name(f, model_id)) for f in sorted(fleet_names))
        _error(f"{where}: the {kind} app of {model_id!r} must be named {expected}")
        return EXIT_INVALID
    return config, model_id, name


def _validate_direct_app(where: str, app: Mapping[str, object], fleet_names: set[str]) -> int:
    read = _one_model_app(where, app, fleet_names, direct_model_config, "direct")
    if isinstance(read, int):
        return read
    config, model_id, name = read
    what = (
        f"direct path of {model_id}"
        if config.model(model_id) is not None
        else f"{model_id} is left out by LLM_ALLOWED_MODELS: this app serves no model"
    )
    print(f"{where} ({name}): ok, {what}")
    return EXIT_OK


def _validate_model_app(where: str, app: Mapping[str, object], fleet_names: set[str]) -> int:
    """A model app: its one model valid, its name ``<fleet>.<id>``, its route right."""
    read = _one_model_app(where, app, fleet_names, model_app_config, "model")
    if isinstance(read, int):
        return read
    config, model_id, name = read
    model = config.model(model_id)
    direct = bool(model is not None and model.direct)
    route = app.get("route_prefix", "/")
    wanted = f"/m/{model_id}" if direct else None
    if route != wanted:
        shown = "null" if wanted is None else wanted
        why = "its direct door" if direct else "no HTTP route: the router serves it"
        _error(f"{where}: route_prefix must be {shown} ({why}), got {route!r}")
        return EXIT_INVALID
    what = (
        f"model {model_id} ({model.source}){', direct path too' if direct else ''}"
        if model is not None
        else f"{model_id} is left out by LLM_ALLOWED_MODELS: this app serves no model"
    )
    print(f"{where} ({name}): ok, {what}")
    return EXIT_OK


def _validate_file(name: str) -> int:
    try:
        document = yaml.safe_load(Path(name).read_text())
    except OSError as exc:
        _error(f"{name}: cannot read: {exc.strerror or exc}")
        return EXIT_USAGE
    except yaml.YAMLError as exc:
        _error(f"{name}: not valid YAML: {exc}")
        return EXIT_USAGE
    apps = document.get("applications") if isinstance(document, Mapping) else None
    listed = [
        (index, app)
        for index, app in enumerate(apps if isinstance(apps, list) else [])
        if isinstance(app, Mapping)
    ]
    for index, app in listed:
        old = str(app.get("import_path", ""))
        if old.startswith(("router.", "deployments.")):
            _error(
                f"{name}: applications[{index}]: import_path {old} is now llm_fleet.{old} "
                "(one import root: README, Architecture)"
            )
            return EXIT_INVALID
    found = [(i, app) for i, app in listed if app.get("import_path") == APP_IMPORT_PATH]
    direct = [(i, app) for i, app in listed if app.get("import_path") == DIRECT_IMPORT_PATH]
    model_apps = [(i, app) for i, app in listed if app.get("import_path") == MODEL_APP_IMPORT_PATH]
    if not found:
        _error(f"{name}: no application with import_path {APP_IMPORT_PATH}")
        return EXIT_INVALID
    fleet_names = {str(app.get("name", "default")) for _, app in found}
    direct_names = {str(app.get("name", "default")) for _, app in direct}
    codes = [_validate_app(f"{name}: applications[{i}]", app, direct_names) for i, app in found] + [
        _validate_direct_app(f"{name}: applications[{i}]", app, fleet_names) for i, app in direct
    ]
    codes += [
        _validate_model_app(f"{name}: applications[{i}]", app, fleet_names) for i, app in model_apps
    ]
    for index, app in found:
        fleet = str(app.get("name", "default"))
        own = (app.get("args") or {}).get("models") if isinstance(app.get("args"), Mapping) else []
        if not own and not any(
            str(a.get("name", "")).startswith(f"{fleet}.") for _, a in model_apps
        ):
            _error(f"{name}: applications[{index}] ({fleet}): no models, in its args or as apps")
            codes.append(EXIT_INVALID)
    return _validate_listen(name, document, max(codes))


def _validate_listen(name: str, document: object, code: int) -> int:
    """Check where ``llm-fleet serve`` listens; says where once the rest is ``code`` 0."""
    try:
        listen = resolve_listen(document, os.environ)
    except ConfigError as exc:
        for line in str(exc).splitlines():
            _error(f"{name}: {line}")
        return EXIT_INVALID
    if code != EXIT_OK:
        return code
    print(f"{name}: llm-fleet serve listens at {listen.url}")
    for note in listen.notes:
        print(f"{name}: {note}")
    return EXIT_OK


def _validate(options: argparse.Namespace) -> int:
    return max(_validate_file(name) for name in options.files)


def _serve(options: argparse.Namespace) -> int:
    from llm_fleet.cli.launcher import serve_foreground

    code = _validate_file(options.file)
    return code if code != EXIT_OK else serve_foreground(options.file, options.grace_s)


def _prepare(options: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    status = EXIT_OK
    for model_id in options.ids or list(embedded.EMBEDDED_MODELS):
        try:
            print(f"{model_id}: {embedded.prepare(model_id)}")
        except ModelPreparationError as exc:
            _error(f"{model_id}: {exc}")
            status = EXIT_INVALID
    return status


def _list(options: argparse.Namespace) -> int:
    store = embedded.model_store_dir()
    print(f"store: {store}")
    for model_id, model in embedded.EMBEDDED_MODELS.items():
        state = "prepared" if embedded.is_prepared(store / model_id) else "not prepared"
        print(f"{model_id}\t{state}\t{model.description}")
    return EXIT_OK


def _keys_file(options: argparse.Namespace) -> str:
    path: str | None = options.file or os.environ.get(ENV_KEYS_FILE) or None
    if path is None:
        raise ConfigError(f"no keys file: pass --file or set {ENV_KEYS_FILE}")
    return path


def _create_key(options: argparse.Namespace) -> int:
    path = _keys_file(options)
    models = [m.strip() for m in options.models.split(",") if m.strip()]
    key = keys.create_key(
        path,
        options.name,
        models=models or None,
        rpm=options.rpm,
        tpm=options.tpm,
        max_tokens=options.max_tokens,
        concurrency=options.concurrency,
    )
    print(key)
    created = next(k for k in keys.list_keys(path) if k.name == options.name)
    _error(
        f"key {created.name!r} (id {created.id}) added to {path}. Copy it now: only its "
        "hash is stored, it cannot be shown again."
    )
    return EXIT_OK


def _list_keys(options: argparse.Namespace) -> int:
    def shown(value: int | None) -> str:
        return "-" if value is None else str(value)

    listed = keys.list_keys(_keys_file(options))
    print("name\tid\tmodels\trpm\ttpm\tmax_tokens\tconcurrency\tstate\tcreated")
    for key in listed:
        limits = (key.rpm, key.tpm, key.max_tokens, key.concurrency)
        state = "revoked" if key.revoked else "active"
        created = key.created.strftime("%Y-%m-%dT%H:%M:%SZ")
        print(
            "\t".join([key.name, key.id, ",".join(key.models), *map(shown, limits), state, created])
        )
    return EXIT_OK


def _revoke_key(options: argparse.Namespace) -> int:
    entry = keys.revoke_key(_keys_file(options), options.key)
    print(f"key {entry.name!r} (id {entry.id}) is revoked")
    return EXIT_OK


def _keys_command(command: Callable[[argparse.Namespace], int]) -> Handler:
    def handler(options: argparse.Namespace) -> int:
        try:
            return command(options)
        except ConfigError as exc:
            for line in str(exc).splitlines():
                _error(f"llm-fleet keys: {line}")
            return EXIT_USAGE

    return handler


def _add_keys_commands(commands: Any) -> None:
    sub = commands.add_parser("keys", help="API keys: create, list, revoke").add_subparsers(
        dest="keys_command", required=True
    )
    file_help = f"the keys file (default: ${ENV_KEYS_FILE})"
    create = sub.add_parser("create", help="add a key and print it, once")
    create.add_argument("--file", help=file_help)
    create.add_argument("--name", required=True, help="unique name of the key's holder")
    create.add_argument("--models", default="*", help="comma-separated model ids (default: *)")
    for flag, what in (
        ("--rpm", "requests per minute"),
        ("--tpm", "prompt + completion tokens per minute"),
        ("--max-tokens", "cap on max_tokens, below each model's limit"),
        ("--concurrency", "requests in flight at once"),
    ):
        create.add_argument(flag, type=int, help=f"{what} (default: no limit)")
    create.set_defaults(handler=_keys_command(_create_key))
    listing = sub.add_parser("list", help="names, ids, models, limits; never keys or hashes")
    listing.add_argument("--file", help=file_help)
    listing.set_defaults(handler=_keys_command(_list_keys))
    revoke = sub.add_parser("revoke", help="revoke a key by name or id")
    revoke.add_argument("--file", help=file_help)
    revoke.add_argument("key", metavar="NAME_OR_ID")
    revoke.set_defaults(handler=_keys_command(_revoke_key))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llm-fleet", description="llm-fleet tools")
    commands = parser.add_subparsers(dest="command", required=True)
    validate = commands.add_parser("validate", help="validate Ray Serve config files")
    validate.add_argument("files", nargs="+", metavar="FILE")
    validate.set_defaults(handler=_validate)
    models = commands.add_parser("models", help="embedded models").add_subparsers(
        dest="models_command", required=True
    )
    prepare = models.add_parser("prepare", help="convert embedded models into the store")
    prepare.add_argument("ids", nargs="*", metavar="ID", help="default: every embedded model")
    prepare.set_defaults(handler=_prepare)
    models.add_parser("list", help="list embedded models").set_defaults(handler=_list)
    add_weights_commands(commands)
    _add_keys_commands(commands)
    serve = commands.add_parser("serve", help="validate, then serve a config in the foreground")
    serve.add_argument("file", metavar="FILE")
    serve.add_argument(
        "--grace-s",
        type=float,
        default=30.0,
        help="on Ctrl-C or SIGTERM, refuse new requests and give those in flight this long "
        "before stopping (0: end them at once with an error; default 30)",
    )
    serve.set_defaults(handler=_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code (see the module docstring)."""
    try:
        options = _parser().parse_args(argv)
    except SystemExit as exc:  # argparse exits on usage errors and --help
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    handler = options.handler
    code: int = handler(options)
    return code


if __name__ == "__main__":
    sys.exit(main())
