"""API keys in the router: who may call which route and model, token caps, hot reload,
and key material kept out of every log."""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import pytest
import yaml
from fastapi.testclient import TestClient

from llm_fleet.deployments.errors import ConfigError
from llm_fleet.router.auth import KeyRing, bearer_token, load_keyring
from llm_fleet.router.keys_file import create_key, load_keys, new_key, revoke_key, write_keys
from tests.fake_time import FakeTime
from tests.fakes import (
    CHAT_MODEL,
    COMPLETIONS_MODEL,
    DEFAULT_MAX_TOKENS,
    MAX_TOKENS_LIMIT,
    NOT_ALLOWED_MODEL,
    RecordingMetrics,
    fleet_config,
    make_fleet,
)
from tests.unit.ops_helpers import CHAT_PATH, COMPLETIONS_PATH, chat, openai_error

if TYPE_CHECKING:
    import httpx2  # what starlette's TestClient is built on

OTHER_MODEL = "some-other-model"
METRICS_TEXT = "# HELP fake_metric a metric\nfake_metric 1\n"


async def fake_metrics_text() -> str:
    return METRICS_TEXT


@dataclass
class Keys:
    path: Path
    plain: dict[str, str]

    def ring(self) -> KeyRing:
        return KeyRing.from_file(self.path, poll_s=0)  # re-check the file on every request

    def header(self, name: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.plain[name]}"}

    def entry_id(self, name: str) -> str:
        return next(k.id for k in load_keys(self.path).keys if k.name == name)


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    path = tmp_path / "keys.yaml"
    plain = {
        "all": create_key(path, "all"),
        "chat-only": create_key(path, "chat-only", models=[CHAT_MODEL]),
        "elsewhere": create_key(path, "elsewhere", models=[OTHER_MODEL]),
        "revoked": create_key(path, "revoked"),
    }
    revoke_key(path, "revoked")
    return Keys(path, plain)


@pytest.fixture
def http(keys: Keys) -> Iterator[TestClient]:
    fleet = make_fleet(keys=keys.ring(), metrics_text=fake_metrics_text)
    with TestClient(fleet.app) as client:
        yield client


# --- every route x every auth case --------------------------------------------------

ROUTES: dict[str, tuple[str, str, dict[str, Any] | None]] = {
    "models": ("GET", "/v1/models", None),
    "model": ("GET", f"/v1/models/{CHAT_MODEL}", None),
    "chat": ("POST", CHAT_PATH, chat()),
    "completions": ("POST", COMPLETIONS_PATH, {"model": COMPLETIONS_MODEL, "prompt": "one two"}),
    "metrics": ("GET", "/metrics", None),
    "api generate": ("POST", "/api/generate", {"model": CHAT_MODEL, "prompt": "one two"}),
    "api chat stream": ("POST", "/api/chat/stream", chat()),
    "api llms": ("GET", "/api/llms", None),
    "live": ("GET", "/health/live", None),
    "ready": ("GET", "/health/ready", None),
}
AUTH_CASES = ("no header", "malformed", "unknown key", "revoked key", "wrong model", "allowed")


def auth_headers(keys: Keys, case: str) -> dict[str, str]:
    return {
        "no header": {},
        "malformed": {"Authorization": f"Token {keys.plain['all']}"},
        "unknown key": {"Authorization": f"Bearer {new_key()}"},
        "revoked key": keys.header("revoked"),
        "wrong model": keys.header("elsewhere"),
        "allowed": keys.header("all"),
    }[case]


def call(http: TestClient, route: str, headers: dict[str, str]) -> httpx2.Response:
    method, path, body = ROUTES[route]
    if method == "GET":
        return http.get(path, headers=headers)
    return http.post(path, json=body, headers=headers)


def assert_401(response: httpx2.Response) -> None:
    assert response.status_code == 401, response.text
    assert response.json() == {
        "error": {
            "message": "Invalid or missing API key.",
            "type": "invalid_request_error",
            "param": None,
            "code": "invalid_api_key",
            "request_id": response.headers["x-request-id"],
        }
    }
    assert response.headers["www-authenticate"] == "Bearer"


def model_not_found(model: str) -> dict[str, Any]:
    message = f"The model '{model}' does not exist or you do not have access to it."
    return {"message": message, "type": "invalid_request_error", "param": "model"}


@pytest.mark.parametrize("case", AUTH_CASES)
@pytest.mark.parametrize("route", list(ROUTES))
def test_every_route_and_auth_case(http: TestClient, keys: Keys, route: str, case: str) -> None:
    response = call(http, route, auth_headers(keys, case))
    if route in ("live", "ready"):
        # Open for probes and load balancers: exactly what a fleet without keys answers.
        with TestClient(make_fleet().app) as open_http:
            expected = call(open_http, route, {})
        assert (response.status_code, response.json()) == (expected.status_code, expected.json())
        return
    if case in ("no header", "malformed", "unknown key", "revoked key"):
        assert_401(response)
        return
    if case == "wrong model":
        if route in ("model", "chat", "completions", "api generate", "api chat stream"):
            model = CHAT_MODEL if route != "completions" else COMPLETIONS_MODEL
            error = openai_error(response, 404, "model_not_found")
            assert {k: error[k] for k in ("message", "type", "param")} == model_not_found(model)
        elif route == "models":
            assert response.status_code == 200 and response.json()["data"] == []
        elif route == "api llms":
            assert response.status_code == 200 and response.json()["models"] == []
        else:
            assert (response.status_code, response.text) == (200, METRICS_TEXT)
        return
    assert response.status_code == 200, response.text
    if route == "models":
        assert {card["id"] for card in response.json()["data"]} == {CHAT_MODEL, COMPLETIONS_MODEL}
    elif route == "model":
        assert response.json()["id"] == CHAT_MODEL
    elif route == "metrics":
        assert response.text == METRICS_TEXT
    elif route == "api llms":
        assert {m["id"] for m in response.json()["models"]} == {CHAT_MODEL, COMPLETIONS_MODEL}
    elif route == "api chat stream":
        assert response.text.rstrip().endswith("data: [DONE]")
        assert '"done":true' in response.text
    else:
        assert response.json()["usage"]["completion_tokens"] > 0


MALFORMED = (
    "Bearer",
    "Bearer ",
    "{key}",
    "bearer{key}",
    "Bearer {key} {key}",
    "Bearer sk-{key}",
    "Basic {key}",
    "Bearer lfk_" + "a" * 300,
)


@pytest.mark.parametrize("value", MALFORMED)
def test_malformed_authorization_is_the_same_401(http: TestClient, keys: Keys, value: str) -> None:
    headers = {"Authorization": value.format(key=keys.plain["all"])}
    assert_401(http.post(CHAT_PATH, json=chat(), headers=headers))


def test_the_scheme_is_case_insensitive(http: TestClient, keys: Keys) -> None:
    response = http.post(
        CHAT_PATH, json=chat(), headers={"Authorization": "bearer " + keys.plain["all"]}
    )
    assert response.status_code == 200


def test_bearer_token_parsing() -> None:
    assert bearer_token("Bearer lfk_abc") == "lfk_abc"
    assert bearer_token("BEARER   lfk_abc ") == "lfk_abc"
    for value in (None, "", "lfk_abc", "Bearer abc", "Bearer lfk_a lfk_b", "Basic lfk_abc"):
        assert bearer_token(value) is None


def test_authenticate_compares_every_key_whichever_matches(
    keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No early exit: how long a check takes says nothing about which key matched."""
    from llm_fleet.router import auth

    ring, compared = keys.ring(), []

    def compare_digest(a: bytes, b: bytes) -> bool:
        compared.append(b)
        return hmac.compare_digest(a, b)

    monkeypatch.setattr(auth, "hmac", SimpleNamespace(compare_digest=compare_digest))
    seen = {}
    for case in ("all", "elsewhere", "unknown key"):
        header = keys.header(case) if case in keys.plain else auth_headers(keys, case)
        compared.clear()
        principal = ring.authenticate(header["Authorization"])
        seen[case] = (principal and principal.name, len(compared), len(set(compared)))
    every = (len(ring), len(ring))
    assert seen == {
        "all": ("all", *every),
        "elsewhere": ("elsewhere", *every),
        "unknown key": (None, *every),
    }


def test_401_comes_before_reading_the_body(http: TestClient) -> None:
    assert_401(http.post(CHAT_PATH, content=b"{not json"))
    assert_401(http.post(CHAT_PATH, content=b"x" * (5 * 1024 * 1024)))


def test_without_keys_no_header_is_needed_and_any_is_ignored() -> None:
    with TestClient(make_fleet(metrics_text=fake_metrics_text).app) as http:
        for headers in ({}, {"Authorization": "Bearer whatever"}):
            assert http.post(CHAT_PATH, json=chat(), headers=headers).status_code == 200
            assert http.get("/metrics", headers=headers).status_code == 200


# --- models a key may use -----------------------------------------------------------


def test_a_key_lists_only_its_models(http: TestClient, keys: Keys) -> None:
    listed = http.get("/v1/models", headers=keys.header("chat-only")).json()["data"]
    assert [card["id"] for card in listed] == [CHAT_MODEL]
    assert http.get(f"/v1/models/{CHAT_MODEL}", headers=keys.header("chat-only")).status_code == 200


@pytest.mark.parametrize("route", ["model", "completions"])
def test_a_model_the_key_may_not_use_is_exactly_an_unknown_model(
    http: TestClient, keys: Keys, route: str
) -> None:
    def ask(model: str) -> httpx2.Response:
        headers = keys.header("chat-only")
        if route == "model":
            return http.get(f"/v1/models/{model}", headers=headers)
        return http.post(COMPLETIONS_PATH, json={"model": model, "prompt": "hi"}, headers=headers)

    def seen(response: httpx2.Response, model: str) -> tuple[int, Any, list[str]]:
        body = response.json()
        body["error"]["message"] = body["error"]["message"].replace(model, "<id>")
        body["error"].pop("request_id")
        return response.status_code, body, sorted(response.headers.keys())

    forbidden = seen(ask(COMPLETIONS_MODEL), COMPLETIONS_MODEL)
    assert forbidden[0] == 404 and forbidden[1]["error"]["code"] == "model_not_found"
    for missing in ("no-such-model", NOT_ALLOWED_MODEL):
        assert seen(ask(missing), missing) == forbidden


# --- the key's max_tokens cap -------------------------------------------------------


def capped_fleet(tmp_path: Path, cap: int) -> tuple[TestClient, dict[str, str]]:
    path = tmp_path / "capped.yaml"
    key = create_key(path, "capped", max_tokens=cap)
    fleet = make_fleet(keys=KeyRing.from_file(path))
    return TestClient(fleet.app), {"Authorization": f"Bearer {key}"}


def test_the_key_cap_below_the_model_limit_wins(tmp_path: Path) -> None:
    words = " ".join(f"w{i}" for i in range(20))
    http, headers = capped_fleet(tmp_path, cap=3)
    with http:
        reply = http.post(CHAT_PATH, json=chat(words), headers=headers)
        assert reply.json()["usage"]["completion_tokens"] == 3  # default = min(12, 3)
        assert http.post(CHAT_PATH, json=chat(words, max_tokens=3), headers=headers).is_success
        for field in ("max_tokens", "max_completion_tokens"):
            response = http.post(CHAT_PATH, json=chat(words, **{field: 4}), headers=headers)
            error = openai_error(response, 400, "max_tokens_exceeded")
            assert error["param"] == field
            assert error["message"] == f"{field}=4 exceeds this API key's limit of 3 output tokens."
        completion = {"model": COMPLETIONS_MODEL, "prompt": words, "max_tokens": 9}
        response = http.post(COMPLETIONS_PATH, json=completion, headers=headers)
        openai_error(response, 400, "max_tokens_exceeded")


def test_the_model_limit_below_the_key_cap_wins(tmp_path: Path) -> None:
    words = " ".join(f"w{i}" for i in range(20))
    http, headers = capped_fleet(tmp_path, cap=MAX_TOKENS_LIMIT + 100)
    with http:
        reply = http.post(CHAT_PATH, json=chat(words), headers=headers)
        assert reply.json()["usage"]["completion_tokens"] == DEFAULT_MAX_TOKENS
        over = chat(words, max_tokens=MAX_TOKENS_LIMIT + 1)
        response = http.post(CHAT_PATH, json=over, headers=headers)
        error = openai_error(response, 400, "max_tokens_exceeded")
        assert f"this model's limit of {MAX_TOKENS_LIMIT}" in error["message"]


# --- records, access log, startup ---------------------------------------------------


def test_refused_keys_are_counted_as_auth_and_the_access_line_names_the_key_id(
    keys: Keys, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="llm_fleet.access")
    metrics = RecordingMetrics()
    with TestClient(make_fleet(keys=keys.ring(), metrics=metrics).app) as http:
        http.post(CHAT_PATH, json=chat(), headers={"X-Request-Id": "no-key"})
        http.post(CHAT_PATH, json=chat(), headers={"X-Request-Id": "ok", **keys.header("all")})
    finished = {r.request_id: r for r in metrics.finished}
    assert (finished["no-key"].status, finished["no-key"].rejection) == (401, "auth")
    assert finished["no-key"].error_code == "invalid_api_key"
    assert (finished["ok"].status, finished["ok"].rejection) == (200, None)
    lines = {vars(r)["request_id"]: vars(r) for r in caplog.records if r.name == "llm_fleet.access"}
    assert lines["no-key"]["key"] is None
    assert lines["ok"]["key"] == keys.entry_id("all")


def test_without_a_keys_file_the_router_warns_loudly(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="llm_fleet.router.auth")
    assert load_keyring(fleet_config()) is None
    [record] = [r for r in caplog.records if r.name == "llm_fleet.router.auth"]
    assert record.levelno == logging.WARNING and "AUTH IS OFF" in record.getMessage()


def test_a_keys_file_is_loaded_at_startup_and_a_bad_one_stops_it(keys: Keys) -> None:
    ring = load_keyring(fleet_config(keys_file=str(keys.path)))
    assert ring is not None and len(ring) == 3  # the revoked key does not count
    keys.path.write_text("keys: 3\n")
    with pytest.raises(ConfigError, match="keys: Input should be a valid list"):
        load_keyring(fleet_config(keys_file=str(keys.path)))
    with pytest.raises(ConfigError, match="cannot read"):
        KeyRing.from_file(keys.path.with_name("missing.yaml"))


# --- hot reload ---------------------------------------------------------------------


def edit_entry(path: Path, name: str, **changes: Any) -> None:
    current = load_keys(path)
    updated = [k.model_copy(update=changes) if k.name == name else k for k in current.keys]
    write_keys(path, current.model_copy(update={"keys": updated}))


def test_keys_added_changed_and_revoked_while_serving(
    keys: Keys, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="llm_fleet.router.auth")
    with TestClient(make_fleet(keys=keys.ring()).app) as http:
        added = create_key(keys.path, "added-later")
        assert http.post(
            CHAT_PATH, json=chat(), headers={"Authorization": f"Bearer {added}"}
        ).is_success

        assert http.post(CHAT_PATH, json=chat(), headers=keys.header("all")).is_success
        edit_entry(keys.path, "all", models=[COMPLETIONS_MODEL])
        response = http.post(CHAT_PATH, json=chat(), headers=keys.header("all"))
        openai_error(response, 404, "model_not_found")
        listed = http.get("/v1/models", headers=keys.header("all")).json()["data"]
        assert [card["id"] for card in listed] == [COMPLETIONS_MODEL]

        revoke_key(keys.path, "added-later")
        assert_401(http.post(CHAT_PATH, json=chat(), headers={"Authorization": f"Bearer {added}"}))

        # A broken file keeps the last good keys, and says so.
        good = keys.path.read_text()
        keys.path.write_text(good.replace("keys:", "keys: [", 1))
        assert http.post(CHAT_PATH, json=chat(), headers=keys.header("chat-only")).is_success
        keys.path.write_text(yaml.safe_dump({"keys": [{"name": "x", "rpm": "lots"}]}))
        assert http.post(CHAT_PATH, json=chat(), headers=keys.header("chat-only")).is_success
        keys.path.unlink()
        assert http.post(CHAT_PATH, json=chat(), headers=keys.header("chat-only")).is_success
        errors = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert len(errors) == 3, [r.getMessage() for r in errors]
        assert all("keeping the last good keys" in r.getMessage() for r in errors)
        assert "keys.0.rpm" in errors[1].getMessage()

        # Fixed again: the new file rules.
        keys.path.write_text(good)
        assert_401(http.post(CHAT_PATH, json=chat(), headers={"Authorization": f"Bearer {added}"}))
        assert http.post(CHAT_PATH, json=chat(), headers=keys.header("chat-only")).is_success


def test_the_file_is_read_again_on_access_only_after_poll_s(keys: Keys) -> None:
    time = FakeTime()
    ring = KeyRing.from_file(keys.path, poll_s=2.0, clock=time)
    added = create_key(keys.path, "later")
    time.now += 1.5
    assert ring.authenticate(f"Bearer {added}") is None  # not checked again yet
    time.now += 1.0
    principal = ring.authenticate(f"Bearer {added}")  # checked again on this access
    assert principal is not None and principal.name == "later" and principal.models is None
    revoke_key(keys.path, "later")
    time.now += 1.5
    assert ring.authenticate(f"Bearer {added}") is not None  # checked 1.5 s ago: not yet
    assert ring.refresh() is True  # an explicit refresh does not wait
    assert ring.authenticate(f"Bearer {added}") is None
    assert ring.refresh() is False  # unchanged since


def test_the_background_watch_reloads_every_poll_s_without_any_request(
    keys: Keys, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="llm_fleet.router.auth")
    time = FakeTime()

    async def scenario() -> list[int]:
        # A poll_s no request would ever reach: only the watch can reload.
        ring = KeyRing.from_file(keys.path, poll_s=2.0, clock=time, sleep=time.sleep)
        await ring.start()
        seen = []
        try:
            create_key(keys.path, "watched")
            await time.advance(1.5)
            seen.append(len(ring))  # the watch has not looked yet
            await time.advance(0.5)
            seen.append(len(ring))
            create_key(keys.path, "watched-too")
            await time.advance(2.0)
            seen.append(len(ring))
        finally:
            await ring.stop()
        create_key(keys.path, "after-stop")
        await time.advance(10.0)
        seen.append(len(ring))
        return seen

    assert asyncio.run(scenario()) == [3, 4, 5, 5]
    assert [r.getMessage() for r in caplog.records if "reloaded" in r.getMessage()] == [
        f"keys file {keys.path} reloaded: 4 active keys, 1 revoked",
        f"keys file {keys.path} reloaded: 5 active keys, 1 revoked",
    ]


def test_a_failing_watch_tick_is_logged_and_the_watch_goes_on(
    keys: Keys, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    time = FakeTime()
    ring = KeyRing.from_file(keys.path, poll_s=2.0, clock=time, sleep=time.sleep)
    real_refresh, calls = ring.refresh, []

    def refresh_failing_once() -> bool:
        calls.append(time.now)
        if len(calls) == 1:
            raise OSError("stat failed")
        return real_refresh()

    monkeypatch.setattr(ring, "refresh", refresh_failing_once)

    async def scenario() -> int:
        await ring.start()
        create_key(keys.path, "watched")
        await time.advance(4.0)
        await ring.stop()
        return len(ring)

    assert asyncio.run(scenario()) == 4
    assert calls == [1002.0, 1004.0]
    [error] = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert error.name == "llm_fleet.router.auth"
    assert error.getMessage() == "keys file watch failed; retrying"


# --- no key material in any log -----------------------------------------------------


def test_no_key_material_reaches_any_log(
    keys: Keys, tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    from llm_fleet.cli.main import main

    caplog.set_level(logging.DEBUG)
    assert main(["keys", "create", "--file", str(keys.path), "--name", "cli"]) == 0
    keys.plain["cli"] = capsys.readouterr().out.strip()
    unknown = new_key()
    with TestClient(make_fleet(keys=keys.ring(), metrics=RecordingMetrics()).app) as http:
        for name in keys.plain:
            for stream in (False, True):
                http.post(CHAT_PATH, json=chat(stream=stream), headers=keys.header(name))
                completion = {"model": COMPLETIONS_MODEL, "prompt": "a", "stream": stream}
                http.post(COMPLETIONS_PATH, json=completion, headers=keys.header(name))
            http.get("/v1/models", headers=keys.header(name))
            http.post(CHAT_PATH, json=chat(max_tokens=10_000), headers=keys.header(name))
        http.post(CHAT_PATH, json=chat(), headers={"Authorization": f"Bearer {unknown}"})
        http.post(CHAT_PATH, json=chat(), headers={"Authorization": unknown})
        good = keys.path.read_text()
        # A file with a key pasted where it does not belong: the error names the field only.
        pasted = yaml.safe_load(good)
        pasted["keys"][0]["key"] = keys.plain["all"]
        keys.path.write_text(yaml.safe_dump(pasted))
        http.post(CHAT_PATH, json=chat(), headers=keys.header("all"))
        keys.path.write_text(good + f"\n  - {keys.plain['all']}: [\n")
        http.post(CHAT_PATH, json=chat(), headers=keys.header("all"))
        keys.path.write_text(good)
        http.post(CHAT_PATH, json=chat(), headers=keys.header("all"))
    main(["keys", "list", "--file", str(keys.path)])
    main(["keys", "revoke", "--file", str(keys.path), "cli"])
    assert any(r.name == "llm_fleet.access" for r in caplog.records)
    assert any(
        r.levelno == logging.ERROR and r.name == "llm_fleet.router.auth" for r in caplog.records
    )

    secrets = [*keys.plain.values(), unknown]
    secrets += [s.removeprefix("lfk_") for s in secrets]
    secrets += [k.hash.removeprefix("sha256:") for k in load_keys(keys.path).keys]
    for record in caplog.records:
        text = f"{record.getMessage()} {vars(record)}"
        leaked = [s for s in secrets if s in text]
        assert not leaked, (record.name, record.getMessage())
