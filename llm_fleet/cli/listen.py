"""Where ``llm-fleet serve`` listens: the config file's ``http_options`` with the older
LLM Inference API service's variables applied, and its TLS files checked before
anything starts.

=========================  =====================================================
``LLM_INFERENCE_HOSTNAME``  replaces ``http_options.host``
``LLM_INFERENCE_PORT``      replaces ``http_options.port`` (1 to 65535)
``SERVER_SSL_ENABLED``      ``true``: HTTPS with the two files below, which replace
                            ``http_options.ssl_certfile`` / ``ssl_keyfile``;
                            ``false`` or unset: the file's own TLS, if any, stays
``TLS_SERVER_CERT_PATH``    the server's certificate (PEM, its chain after it)
``TLS_SERVER_KEY_PATH``     its private key (PEM)
=========================  =====================================================

The environment wins over the file, as every other override does (``LLM_ALLOWED_MODELS``,
``CORS_ALLOWED_ORIGINS``...): operators of that service set these in the container's or
unit's environment and expect them to take effect, and our shipped configs set host and
port explicitly, so a file that won would make the variables dead on ``make serve``. The
launcher prints each file value a variable replaced. ``SERVER_SSL_ENABLED=false`` (that
service's default) never turns off TLS the file asks for: a copied environment must not
downgrade a gateway to plain HTTP. With neither set, the file's values or Serve's
defaults apply: ``127.0.0.1:8000``, loopback, not that service's ``0.0.0.0:8091``, since
a gateway with no keys file has no auth.

Relative paths are taken from the current folder and written absolute: Serve's proxy
runs in a Ray actor with another working directory. Error messages name the variable or
field and the path, never a file's contents.
"""

from __future__ import annotations

import ssl
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from llm_fleet.deployments.errors import ConfigError

HOST_ENV = "LLM_INFERENCE_HOSTNAME"
PORT_ENV = "LLM_INFERENCE_PORT"
TLS_ENV = "SERVER_SSL_ENABLED"
CERT_ENV = "TLS_SERVER_CERT_PATH"
KEY_ENV = "TLS_SERVER_KEY_PATH"
LISTEN_ENV = (HOST_ENV, PORT_ENV, TLS_ENV, CERT_ENV, KEY_ENV)
# Ray Serve's HTTPOptions defaults (ray/serve/config.py), shown when the file sets none.
SERVE_DEFAULT_HOST, SERVE_DEFAULT_PORT = "127.0.0.1", 8000
PATH_FIELDS = ("ssl_certfile", "ssl_keyfile", "ssl_ca_certs")


@dataclass(frozen=True)
class Listen:
    """The ``http_options`` ``serve run`` gets, and what the environment did to them."""

    http_options: dict[str, Any]
    # For stderr: each file value a variable replaced, each variable ignored.
    notes: tuple[str, ...] = ()

    @property
    def url(self) -> str:
        host = str(self.http_options.get("host", SERVE_DEFAULT_HOST))
        port = self.http_options.get("port", SERVE_DEFAULT_PORT)
        scheme = "https" if self.http_options.get("ssl_certfile") else "http"
        return f"{scheme}://{f'[{host}]' if ':' in host else host}:{port}"


def _port(value: str) -> int:
    if not value.isdigit() or not 1 <= int(value) <= 65535:
        raise ConfigError(f"{PORT_ENV}: must be a port number from 1 to 65535, got {value!r}")
    return int(value)


def _tls_enabled(env: Mapping[str, str]) -> bool:
    value = env.get(TLS_ENV, "").strip().lower()
    if value not in ("", "true", "false"):
        raise ConfigError(f"{TLS_ENV}: must be true or false, got {env[TLS_ENV]!r}")
    return value == "true"


def _from_env(options: dict[str, Any], env: Mapping[str, str]) -> tuple[dict[str, str], list[str]]:
    """Apply the variables to ``options`` in place; returns each field's source label and
    the notes. Raises ConfigError listing every invalid variable."""
    labels = {field: f"http_options.{field}" for field in PATH_FIELDS}
    notes: list[str] = []
    errors: list[str] = []

    def replace(field: str, value: object, variable: str) -> None:
        if field in options and options[field] != value:
            notes.append(f"{variable} replaces the file's http_options.{field} {options[field]}")
        options[field] = value

    if host := env.get(HOST_ENV, "").strip():
        replace("host", host, HOST_ENV)
    if port := env.get(PORT_ENV, "").strip():
        try:
            replace("port", _port(port), PORT_ENV)
        except ConfigError as exc:
            errors.append(str(exc))
    paths = {variable: env.get(variable, "").strip() for variable in (CERT_ENV, KEY_ENV)}
    try:
        enabled = _tls_enabled(env)
    except ConfigError as exc:
        errors.append(str(exc))
        enabled = False
    if enabled:
        missing = [variable for variable, path in paths.items() if not path]
        if missing:
            errors.append(f"{TLS_ENV}=true needs {' and '.join(missing)} (PEM files)")
        else:
            replace("ssl_certfile", paths[CERT_ENV], CERT_ENV)
            replace("ssl_keyfile", paths[KEY_ENV], KEY_ENV)
            labels.update(ssl_certfile=CERT_ENV, ssl_keyfile=KEY_ENV)
    elif any(paths.values()):
        given = " and ".join(variable for variable, path in paths.items() if path)
        notes.append(f"{given} ignored: {TLS_ENV} is not true")
    if errors:
        raise ConfigError("\n".join(errors))
    return labels, notes


class _EncryptedKey(Exception):
    """OpenSSL asked for a password the file does not give."""


def _no_password() -> bytes:
    raise _EncryptedKey  # rather than OpenSSL asking at the terminal


def _check_tls(options: Mapping[str, Any], labels: Mapping[str, str]) -> None:
    """Raise ConfigError unless the TLS files are readable and the pair loads."""

    def shown(field: str) -> str:
        return f"{labels[field]}={options[field]}"

    certfile, keyfile = options.get("ssl_certfile"), options.get("ssl_keyfile")
    if bool(certfile) != bool(keyfile):
        given, absent = (
            ("ssl_certfile", "ssl_keyfile") if certfile else ("ssl_keyfile", "ssl_certfile")
        )
        raise ConfigError(f"{shown(given)}: HTTPS needs http_options.{absent} too")
    errors = []
    for field in PATH_FIELDS:
        if options.get(field):
            try:
                with Path(options[field]).open("rb"):
                    pass
            except OSError as exc:
                errors.append(f"{shown(field)}: cannot read: {exc.strerror or type(exc).__name__}")
    if errors:
        raise ConfigError("\n".join(errors))
    if not certfile:
        return
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_verify_locations(cafile=certfile)
    except ssl.SSLError:
        raise ConfigError(f"{shown('ssl_certfile')}: not a PEM certificate") from None
    password: str | Callable[[], bytes] = options.get("ssl_keyfile_password") or _no_password
    try:
        context.load_cert_chain(certfile, keyfile, password=password)
    except _EncryptedKey:
        raise ConfigError(
            f"{shown('ssl_keyfile')}: the key is encrypted and http_options.ssl_keyfile_password "
            "is not set"
        ) from None
    except ssl.SSLError as exc:
        what = (
            f"does not match the certificate {shown('ssl_certfile')}"
            if exc.reason == "KEY_VALUES_MISMATCH"
            else "not a PEM private key (or its password is wrong)"
        )
        raise ConfigError(f"{shown('ssl_keyfile')}: {what}") from None


def resolve(document: object, env: Mapping[str, str]) -> Listen:
    """The ``http_options`` of the Serve config ``document`` with ``env`` applied, TLS
    files checked. Raises ConfigError, one line per problem."""
    given = document.get("http_options") if isinstance(document, Mapping) else None
    if given is not None and not isinstance(given, Mapping):
        raise ConfigError(f"http_options: must be a mapping, got {type(given).__name__}")
    options = dict(given or {})
    labels, notes = _from_env(options, env)
    for field in PATH_FIELDS:
        if options.get(field):
            options[field] = str(Path(options[field]).expanduser().absolute())
    _check_tls(options, labels)
    return Listen(options, tuple(notes))


def serve_config(path: str, env: Mapping[str, str]) -> tuple[Path | None, Listen]:
    """Resolve ``path``'s ``http_options``; when they differ from the file's, write the
    file with them to a new temporary file (the caller removes it) and return its path
    with them, else ``(None, ...)``. Raises ConfigError (or OSError, yaml.YAMLError)."""
    document = yaml.safe_load(Path(path).read_text())
    listen = resolve(document, env)
    if not isinstance(document, dict) or listen.http_options == (
        document.get("http_options") or {}
    ):
        return None, listen
    document["http_options"] = listen.http_options
    with tempfile.NamedTemporaryFile(
        "w", prefix="llm-fleet-serve-", suffix=".yaml", delete=False
    ) as derived:
        yaml.safe_dump(document, derived, sort_keys=False)
    return Path(derived.name), listen
