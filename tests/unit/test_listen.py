"""Where ``llm-fleet serve`` listens: the older service's variables over the config
file's ``http_options``, and TLS files that must load before anything starts."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from llm_fleet.cli import launcher, listen
from llm_fleet.cli.main import main
from llm_fleet.deployments.errors import ConfigError
from tests.tls_files import TlsFiles, make_tls_files

REPO = Path(__file__).resolve().parents[2]
LOCAL_CONFIG = REPO / "serve_config.local.yaml"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (*listen.LISTEN_ENV, "LLM_ALLOWED_MODELS"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(autouse=True)
def _signals() -> Iterator[None]:
    # serve_foreground takes SIGINT and SIGTERM over for its own process: give them back.
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    yield
    for sig, handler in handlers.items():
        signal.signal(sig, handler)


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return make_tls_files(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def other_tls(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return make_tls_files(tmp_path_factory.mktemp("other-tls"))


def tls_env(tls: TlsFiles) -> dict[str, str]:
    return {listen.TLS_ENV: "true", listen.CERT_ENV: str(tls.cert), listen.KEY_ENV: str(tls.key)}


def local_document() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load(LOCAL_CONFIG.read_text())
    return document


def resolve_error(document: object, env: dict[str, str]) -> str:
    with pytest.raises(ConfigError) as caught:
        listen.resolve(document, env)
    return str(caught.value)


# --- host and port ----------------------------------------------------------------------


def test_with_no_variable_the_files_address_stays() -> None:
    resolved = listen.resolve(local_document(), {})
    assert resolved.http_options == {"host": "127.0.0.1", "port": 8000}
    assert resolved.url == "http://127.0.0.1:8000"
    assert resolved.notes == ()


def test_with_neither_the_file_nor_the_env_it_is_serves_loopback_default() -> None:
    # Deliberately not the older service's 0.0.0.0:8091: loopback unless asked.
    resolved = listen.resolve({"applications": []}, {})
    assert resolved.http_options == {}
    assert resolved.url == "http://127.0.0.1:8000"


def test_the_variables_replace_the_files_host_and_port_and_say_so() -> None:
    env = {listen.HOST_ENV: "0.0.0.0", listen.PORT_ENV: "8091"}
    resolved = listen.resolve(local_document(), env)
    assert resolved.http_options == {"host": "0.0.0.0", "port": 8091}
    assert resolved.url == "http://0.0.0.0:8091"
    assert resolved.notes == (
        "LLM_INFERENCE_HOSTNAME replaces the file's http_options.host 127.0.0.1",
        "LLM_INFERENCE_PORT replaces the file's http_options.port 8000",
    )


def test_the_variables_fill_in_what_the_file_leaves_out_without_a_note() -> None:
    resolved = listen.resolve({"http_options": {"port": 9000}}, {listen.HOST_ENV: "::"})
    assert resolved.http_options == {"host": "::", "port": 9000}
    assert resolved.url == "http://[::]:9000"
    assert resolved.notes == ()


@pytest.mark.parametrize("value", ["abc", "0", "65536", "-1", "80.5"])
def test_a_port_that_is_not_one_is_an_error(value: str) -> None:
    message = resolve_error({}, {listen.PORT_ENV: value})
    assert message == f"LLM_INFERENCE_PORT: must be a port number from 1 to 65535, got {value!r}"


def test_http_options_that_are_not_a_mapping_are_an_error() -> None:
    assert "http_options: must be a mapping" in resolve_error({"http_options": [1]}, {})


# --- TLS from the environment -------------------------------------------------------


def test_tls_from_the_environment(tls: TlsFiles) -> None:
    resolved = listen.resolve(local_document(), {**tls_env(tls), listen.PORT_ENV: "8124"})
    assert resolved.http_options == {
        "host": "127.0.0.1",
        "port": 8124,
        "ssl_certfile": str(tls.cert),
        "ssl_keyfile": str(tls.key),
    }
    assert resolved.url == "https://127.0.0.1:8124"


@pytest.mark.parametrize("value", ["TRUE", "True", "true "])
def test_enabled_is_read_as_that_service_did(value: str, tls: TlsFiles) -> None:
    resolved = listen.resolve({}, {**tls_env(tls), listen.TLS_ENV: value})
    assert resolved.url.startswith("https://")


def test_a_value_other_than_true_or_false_is_an_error(tls: TlsFiles) -> None:
    message = resolve_error({}, {**tls_env(tls), listen.TLS_ENV: "yes"})
    assert message == "SERVER_SSL_ENABLED: must be true or false, got 'yes'"


@pytest.mark.parametrize(
    ("missing", "expected"),
    [
        ((listen.CERT_ENV, listen.KEY_ENV), "TLS_SERVER_CERT_PATH and TLS_SERVER_KEY_PATH"),
        ((listen.CERT_ENV,), "TLS_SERVER_CERT_PATH"),
        ((listen.KEY_ENV,), "TLS_SERVER_KEY_PATH"),
    ],
)
def test_enabled_without_both_paths_is_an_error(
    missing: tuple[str, ...], expected: str, tls: TlsFiles
) -> None:
    env = {k: v for k, v in tls_env(tls).items() if k not in missing}
    assert resolve_error({}, env) == f"SERVER_SSL_ENABLED=true needs {expected} (PEM files)"


def test_every_invalid_variable_is_reported_at_once() -> None:
    message = resolve_error({}, {listen.PORT_ENV: "x", listen.TLS_ENV: "true"})
    assert len(message.splitlines()) == 2


def test_a_missing_file_names_the_variable_and_the_path(tls: TlsFiles, tmp_path: Path) -> None:
    gone = tmp_path / "gone.pem"
    message = resolve_error({}, {**tls_env(tls), listen.KEY_ENV: str(gone)})
    assert message == f"TLS_SERVER_KEY_PATH={gone}: cannot read: No such file or directory"


def test_an_unreadable_file_names_the_variable_and_the_path(tls: TlsFiles, tmp_path: Path) -> None:
    message = resolve_error({}, {**tls_env(tls), listen.CERT_ENV: str(tmp_path)})
    assert message == f"TLS_SERVER_CERT_PATH={tmp_path}: cannot read: Is a directory"


def test_a_key_of_another_certificate_does_not_load(tls: TlsFiles, other_tls: TlsFiles) -> None:
    message = resolve_error({}, {**tls_env(tls), listen.KEY_ENV: str(other_tls.key)})
    assert message == (
        f"TLS_SERVER_KEY_PATH={other_tls.key}: does not match the certificate "
        f"TLS_SERVER_CERT_PATH={tls.cert}"
    )


def test_a_key_given_as_the_certificate_is_not_a_certificate(tls: TlsFiles) -> None:
    message = resolve_error({}, {**tls_env(tls), listen.CERT_ENV: str(tls.key)})
    assert message == f"TLS_SERVER_CERT_PATH={tls.key}: not a PEM certificate"


def test_a_certificate_given_as_the_key_is_not_a_key(tls: TlsFiles) -> None:
    message = resolve_error({}, {**tls_env(tls), listen.KEY_ENV: str(tls.ca)})
    assert (
        message == f"TLS_SERVER_KEY_PATH={tls.ca}: not a PEM private key (or its password is wrong)"
    )


def test_an_encrypted_key_needs_the_files_password(tmp_path: Path) -> None:
    files = make_tls_files(tmp_path, key_password=b"s3cret-pass")
    message = resolve_error({}, tls_env(files))
    assert message == (
        f"TLS_SERVER_KEY_PATH={files.key}: the key is encrypted and "
        "http_options.ssl_keyfile_password is not set"
    )
    wrong = {"http_options": {"ssl_keyfile_password": "nope"}}
    assert "its password is wrong" in resolve_error(wrong, tls_env(files))
    right = {"http_options": {"ssl_keyfile_password": "s3cret-pass"}}
    assert listen.resolve(right, tls_env(files)).url.startswith("https://")


def test_relative_paths_are_made_absolute(tls: TlsFiles, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tls.cert.parent)
    env = {listen.TLS_ENV: "true", listen.CERT_ENV: tls.cert.name, listen.KEY_ENV: tls.key.name}
    options = listen.resolve({}, env).http_options
    assert (options["ssl_certfile"], options["ssl_keyfile"]) == (str(tls.cert), str(tls.key))


# --- TLS from the file, and the two together -----------------------------------------


def file_tls(tls: TlsFiles) -> dict[str, Any]:
    return {"http_options": {"ssl_certfile": str(tls.cert), "ssl_keyfile": str(tls.key)}}


def test_tls_in_the_file_is_checked_the_same_way(tls: TlsFiles, other_tls: TlsFiles) -> None:
    assert listen.resolve(file_tls(tls), {}).url == "https://127.0.0.1:8000"
    document = file_tls(tls)
    document["http_options"]["ssl_keyfile"] = str(other_tls.key)
    assert resolve_error(document, {}) == (
        f"http_options.ssl_keyfile={other_tls.key}: does not match the certificate "
        f"http_options.ssl_certfile={tls.cert}"
    )


def test_a_file_with_a_certificate_and_no_key_is_an_error(tls: TlsFiles) -> None:
    message = resolve_error({"http_options": {"ssl_certfile": str(tls.cert)}}, {})
    assert (
        message == f"http_options.ssl_certfile={tls.cert}: HTTPS needs http_options.ssl_keyfile too"
    )


def test_the_environments_tls_replaces_the_files(tls: TlsFiles, other_tls: TlsFiles) -> None:
    resolved = listen.resolve(file_tls(other_tls), tls_env(tls))
    assert resolved.http_options["ssl_certfile"] == str(tls.cert)
    assert resolved.http_options["ssl_keyfile"] == str(tls.key)
    assert resolved.notes == (
        f"TLS_SERVER_CERT_PATH replaces the file's http_options.ssl_certfile {other_tls.cert}",
        f"TLS_SERVER_KEY_PATH replaces the file's http_options.ssl_keyfile {other_tls.key}",
    )


def test_enabled_false_never_turns_the_files_tls_off(tls: TlsFiles) -> None:
    resolved = listen.resolve(file_tls(tls), {listen.TLS_ENV: "false"})
    assert resolved.url == "https://127.0.0.1:8000"


def test_paths_without_enabled_are_ignored_with_a_note(tls: TlsFiles) -> None:
    env = {listen.CERT_ENV: str(tls.cert), listen.KEY_ENV: str(tls.key)}
    resolved = listen.resolve({}, env)
    assert resolved.url == "http://127.0.0.1:8000"
    assert resolved.notes == (
        "TLS_SERVER_CERT_PATH and TLS_SERVER_KEY_PATH ignored: SERVER_SSL_ENABLED is not true",
    )


# --- the derived config file ---------------------------------------------------------


@pytest.fixture
def derived_files() -> Iterator[list[Path]]:
    made: list[Path] = []
    yield made
    for path in made:
        path.unlink(missing_ok=True)


def test_no_variable_no_derived_file() -> None:
    derived, _ = listen.serve_config(str(LOCAL_CONFIG), {})
    assert derived is None


def test_the_derived_file_is_the_config_with_the_resolved_http_options(
    tls: TlsFiles, derived_files: list[Path]
) -> None:
    env = {**tls_env(tls), listen.PORT_ENV: "8124"}
    derived, resolved = listen.serve_config(str(LOCAL_CONFIG), env)
    assert derived is not None
    derived_files.append(derived)
    written = yaml.safe_load(derived.read_text())
    assert written["http_options"] == resolved.http_options
    assert written["http_options"]["port"] == 8124
    assert written == {**local_document(), "http_options": resolved.http_options}
    assert derived.stat().st_mode & 0o077 == 0  # only its owner reads it


# --- the commands: validate and serve ------------------------------------------------


KEY_MARKERS = ("PRIVATE KEY", "-----BEGIN")


def assert_no_secret(text: str, tls: TlsFiles) -> None:
    for line in tls.key.read_text().splitlines():
        assert line not in text
    for marker in KEY_MARKERS:
        assert marker not in text


@pytest.mark.parametrize(
    "env_of",
    [
        lambda t, o: {**tls_env(t), listen.KEY_ENV: str(o.key)},  # mismatch
        lambda t, o: {**tls_env(t), listen.CERT_ENV: str(t.key)},  # the key as cert
        lambda t, o: {**tls_env(t), listen.KEY_ENV: str(t.ca)},  # a cert as key
        lambda t, o: {**tls_env(t), listen.KEY_ENV: "/nonexistent/key.pem"},
        lambda t, o: {listen.TLS_ENV: "true", listen.KEY_ENV: str(t.key)},
    ],
    ids=["mismatch", "key-as-cert", "cert-as-key", "missing", "no-cert"],
)
def test_validate_and_serve_refuse_bad_tls_before_anything_starts(
    env_of: Any,
    tls: TlsFiles,
    other_tls: TlsFiles,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("serve run started")

    monkeypatch.setattr(launcher, "start", never)
    for name, value in env_of(tls, other_tls).items():
        monkeypatch.setenv(name, value)
    assert main(["validate", str(LOCAL_CONFIG)]) == 1
    out, err = capsys.readouterr()
    assert err.startswith(f"{LOCAL_CONFIG}: ") and "TLS_SERVER_" in err, err
    assert "listens at" not in out
    assert main(["serve", str(LOCAL_CONFIG)]) == 1
    serve_out, serve_err = capsys.readouterr()
    assert serve_err == err
    assert launcher.serve_foreground(str(LOCAL_CONFIG)) == 1  # its own check, for direct callers
    direct_out, direct_err = capsys.readouterr()
    assert direct_err == "".join(f"llm-fleet: {line}\n" for line in err.splitlines())
    for text in (out, err, serve_out, serve_err, direct_out, direct_err):
        assert_no_secret(text, tls)
        assert_no_secret(text, other_tls)


def test_validate_says_where_serve_listens(
    tls: TlsFiles, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name, value in {**tls_env(tls), listen.PORT_ENV: "8091"}.items():
        monkeypatch.setenv(name, value)
    assert main(["validate", str(LOCAL_CONFIG)]) == 0
    out, err = capsys.readouterr()
    assert f"{LOCAL_CONFIG}: llm-fleet serve listens at https://127.0.0.1:8091" in out
    assert f"{LOCAL_CONFIG}: LLM_INFERENCE_PORT replaces the file's http_options.port 8000" in out
    assert err == ""


def test_serve_runs_serve_run_on_the_derived_file_then_removes_it(
    tls: TlsFiles, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    seen: dict[str, Any] = {}

    def fake_start(config: str, **kwargs: Any) -> subprocess.Popen[bytes]:
        seen["config"] = Path(config)
        seen["http_options"] = yaml.safe_load(Path(config).read_text())["http_options"]
        return subprocess.Popen([sys.executable, "-c", "pass"])

    monkeypatch.setattr(launcher, "start", fake_start)
    for name, value in {**tls_env(tls), listen.PORT_ENV: "8124"}.items():
        monkeypatch.setenv(name, value)
    assert launcher.serve_foreground(str(LOCAL_CONFIG), grace_s=0) == 0
    assert seen["config"] != LOCAL_CONFIG
    assert seen["http_options"]["port"] == 8124
    assert seen["http_options"]["ssl_keyfile"] == str(tls.key)
    assert not seen["config"].exists()
    out, err = capsys.readouterr()
    assert f"serving {LOCAL_CONFIG} at https://127.0.0.1:8124" in out
    assert "LLM_INFERENCE_PORT replaces the file's http_options.port 8000" in err


def test_serve_with_no_variable_runs_the_file_itself(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: list[str] = []

    def fake_start(config: str, **kwargs: Any) -> subprocess.Popen[bytes]:
        seen.append(config)
        return subprocess.Popen([sys.executable, "-c", "pass"])

    monkeypatch.setattr(launcher, "start", fake_start)
    assert launcher.serve_foreground(str(LOCAL_CONFIG), grace_s=0) == 0
    assert seen == [str(LOCAL_CONFIG)]
