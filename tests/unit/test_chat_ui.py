"""The chat page (``GET /ui``, ``router/chat_ui.py``) in a real headless chromium on the
app served by uvicorn, the fake engine behind it: it streams, stops, shows the
gateway's errors and renders model output as text. ``tests/serve/test_chat_ui.py`` runs
it on the real fleet."""

from __future__ import annotations

import asyncio
import json
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import Request
from fastapi.testclient import TestClient

from llm_fleet.router.auth import KeyRing
from llm_fleet.router.chat_ui import ASSETS
from llm_fleet.router.keys_file import create_key
from tests.browser import (
    BrowserWatch,
    ask,
    assert_air_gapped,
    last_reply_done,
    open_chat,
    seen_while_streaming,
    serve_app,
    type_key,
    watched_page,
)
from tests.fake_handle import run_sync
from tests.fakes import (
    CHAT_MODEL,
    COMPLETIONS_MODEL,
    DEFAULT_MAX_TOKENS,
    MAX_TOKENS_LIMIT,
    FakeStatusSource,
    make_fleet,
)

if TYPE_CHECKING:
    from collections.abc import Callable

    from playwright.sync_api import Browser


def test_the_page_needs_no_key_and_loads_nothing_from_elsewhere(tmp_path: Path) -> None:
    create_key(tmp_path / "keys.yaml", "reader")
    app = make_fleet(keys=KeyRing.from_file(tmp_path / "keys.yaml")).app
    http = TestClient(app, follow_redirects=False)
    root = http.get("/")
    assert (root.status_code, root.headers["location"]) == (302, "ui")
    page = http.get("/ui")
    assert page.status_code == 200
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "connect-src 'self'" in csp
    assert not re.search(r"(https?:)?//", page.text), "another origin named"
    scripts = re.findall(r"<script( src=\"[^\"]+\")?>(.*?)</script>", page.text, re.S)
    assert scripts and all(src and not inline.strip() for src, inline in scripts), scripts
    for name in ASSETS:
        asset = http.get(f"/ui/{name}")
        assert asset.status_code == 200, name
        assert not re.search(r"https?://", asset.text), name
    script = http.get("/ui/chat.js").text
    assert "innerHTML" not in script and "insertAdjacentHTML" not in script
    assert http.get("/v1/models").status_code == 401  # the API itself still needs a key


def test_a_reply_streams_in_and_its_timings_show(browser: Browser) -> None:
    app = make_fleet(token_delay_s=0.05).app
    words = "one two three Paris four five six seven eight nine ten"
    with serve_app(app) as base_url, watched_page(browser, base_url) as watch:
        open_chat(watch, f"{base_url}/ui", CHAT_MODEL)
        ask(watch, words)
        assert last_reply_done(watch) == words
        assert seen_while_streaming(watch, "Paris")
        stats = watch.page.inner_text("#stats")
        assert re.search(r"time to first token \d+ ms · 11 tokens · [\d.]+ tokens/s", stats), stats
        assert_air_gapped(watch)
        # The fleet table came from /health/live, the picker from /v1/models.
        assert watch.page.locator("#fleet-rows tr").count() >= 2
        assert f"{base_url}/v1/chat/completions" in watch.requests


def test_model_output_with_markup_renders_as_text(browser: Browser) -> None:
    app = make_fleet().app
    hostile = "<script>window.pwned=1</script> <img src=x onerror=window.pwned=2> **bold**"
    with serve_app(app) as base_url, watched_page(browser, base_url) as watch:
        open_chat(watch, f"{base_url}/ui", CHAT_MODEL)
        ask(watch, hostile)
        shown = last_reply_done(watch)
        assert "<script>window.pwned=1</script>" in shown
        reply = watch.page.locator("#conversation .turn.assistant .body").last
        assert reply.locator("script, img").count() == 0
        assert reply.locator("strong").inner_text() == "bold"  # the markdown that is allowed
        assert watch.page.evaluate("() => window.pwned") is None
        assert_air_gapped(watch)


def test_stop_aborts_the_generation(browser: Browser) -> None:
    fleet = make_fleet(token_delay_s=0.1)
    long = " ".join(f"w{i}" for i in range(150))  # within the fake context of 256
    with serve_app(fleet.app) as base_url, watched_page(browser, base_url) as watch:
        open_chat(watch, f"{base_url}/ui", CHAT_MODEL)
        ask(watch, long, max_tokens=MAX_TOKENS_LIMIT)  # 6 s of tokens
        watch.page.locator("#conversation .turn.assistant .body").last.get_by_text(
            "w3", exact=False
        ).wait_for()
        watch.page.click("#stop")
        shown = last_reply_done(watch, timeout_s=5)
        assert watch.page.locator(".turn.assistant[data-stopped='true']").count() == 1
        assert 0 < len(shown.split()) < MAX_TOKENS_LIMIT
        deadline = time.monotonic() + 5
        while run_sync(fleet.unfinished()) != 0:
            assert time.monotonic() < deadline, "the generation went on after Stop"
            time.sleep(0.1)
        assert_air_gapped(watch)


def test_a_wrong_key_shows_the_gateways_401_and_a_right_one_lists_models(
    browser: Browser, tmp_path: Path
) -> None:
    key = create_key(tmp_path / "keys.yaml", "chatter", models=[CHAT_MODEL])
    app = make_fleet(keys=KeyRing.from_file(tmp_path / "keys.yaml")).app
    with serve_app(app) as base_url, watched_page(browser, base_url) as watch:
        watch.page.goto(f"{base_url}/ui")
        error = watch.page.locator("#error")
        error.wait_for()
        assert error.inner_text() == "401: Invalid or missing API key."
        assert type_key(watch, "lfk_not-a-key") == 401
        watch.page.wait_for_function("() => document.querySelector('#error').textContent")
        assert error.inner_text() == "401: Invalid or missing API key."
        assert type_key(watch, key) == 200  # the corrected key clears the list's error
        watch.page.locator(f"#model option[value='{CHAT_MODEL}']").wait_for(state="attached")
        assert error.is_hidden()
        # The picker holds only what the key may use (the fleet serves two models).
        listed = watch.page.eval_on_selector_all("#model option", "os => os.map(o => o.value)")
        assert listed == [CHAT_MODEL]
        open_chat(watch, f"{base_url}/ui", CHAT_MODEL, key=key)
        ask(watch, "hello there")
        assert last_reply_done(watch) == "hello there"
        # The key lives in the tab's session storage, and in no URL the page asked for.
        stored = watch.page.evaluate("() => sessionStorage.getItem('llm-fleet-api-key')")
        assert stored == key
        assert not any(key in url for url in watch.requests)
        assert watch.foreign == []
        # Only the refused calls' network lines, none of the page's own errors.
        assert all("401" in line for line in watch.console_errors), watch.console_errors


def test_the_controls_start_at_the_models_defaults_and_completion_mode_completes(
    browser: Browser,
) -> None:
    """A model's configured sampling and max_tokens fill the controls when it is picked,
    a base model (``generate_route: completions``) opens in completion mode, and the
    page then sends exactly those values to ``/v1/completions``."""
    fields = {
        COMPLETIONS_MODEL: {
            "sampling": {"temperature": 0.3, "top_p": 0.8},
            "generate_route": "completions",
        }
    }
    app = make_fleet(model_fields=fields).app
    with serve_app(app) as base_url, watched_page(browser, base_url) as watch:
        page = watch.page
        open_chat(watch, f"{base_url}/ui", COMPLETIONS_MODEL)
        page.wait_for_function("() => document.querySelector('#temperature').value === '0.3'")
        assert page.input_value("#top-p") == "0.8"
        assert page.input_value("#max-tokens") == str(DEFAULT_MAX_TOKENS)
        assert page.input_value("#mode") == "completion"
        with page.expect_request(lambda r: r.url.endswith("/v1/completions")) as sent:
            ask(watch, "once upon a time")
        body = json.loads(sent.value.post_data or "{}")
        assert (body["prompt"], body["temperature"], body["top_p"], body["max_tokens"]) == (
            "once upon a time",
            0.3,
            0.8,
            DEFAULT_MAX_TOKENS,
        )
        assert "messages" not in body
        assert last_reply_done(watch) == "once upon a time"
        # Another model: its own defaults (none set: the engine's), and chat mode.
        page.select_option("#model", CHAT_MODEL)
        assert (page.input_value("#temperature"), page.input_value("#top-p")) == ("", "")
        assert page.input_value("#max-tokens") == str(DEFAULT_MAX_TOKENS)
        assert page.input_value("#mode") == "chat"
        assert_air_gapped(watch)


def test_a_control_set_once_the_model_is_listed_is_not_reset_by_late_defaults(
    browser: Browser,
) -> None:
    """The picker and the model's defaults appear in one step: a temperature typed as
    soon as the model is listed is the one sent, even when ``/api/llms`` (the defaults)
    answers a second after ``/v1/models`` (the race a loaded machine showed)."""
    fields = {CHAT_MODEL: {"sampling": {"temperature": 0.3}}}
    app = make_fleet(model_fields=fields).app

    @app.middleware("http")
    async def slow_defaults(request: Request, call_next: Callable[..., Any]) -> Any:
        if request.url.path == "/api/llms":
            await asyncio.sleep(1.0)
        return await call_next(request)

    with serve_app(app) as base_url, watched_page(browser, base_url) as watch:
        page = watch.page
        open_chat(watch, f"{base_url}/ui", CHAT_MODEL)
        assert page.input_value("#temperature") == "0.3"
        page.fill("#temperature", "0")
        time.sleep(1.5)  # past any defaults still on their way
        with page.expect_request(lambda r: r.url.endswith("/v1/chat/completions")) as sent:
            ask(watch, "hello")
        assert json.loads(sent.value.post_data or "{}")["temperature"] == 0
        assert last_reply_done(watch) == "hello"


def _fleet_row(watch: BrowserWatch, model: str, timeout_s: float = 15) -> list[str]:
    """``model``'s row in the fleet table once its state cell is filled (the table follows
    the model list on each refresh)."""
    row = watch.page.locator("#fleet-rows tr").filter(has_text=model).first
    row.wait_for(timeout=timeout_s * 1000)
    return [cell.strip() for cell in row.locator("td").all_inner_texts()]


def _wait_for_row(watch: BrowserWatch, model: str, wanted: list[str]) -> None:
    deadline = time.monotonic() + 15  # the page refreshes every 5 s
    while (row := _fleet_row(watch, model)) != wanted:
        assert time.monotonic() < deadline, row
        time.sleep(0.1)


def _shown_error(watch: BrowserWatch) -> str:
    watch.page.wait_for_function("() => document.querySelector('#error').textContent")
    return str(watch.page.inner_text("#error"))


def test_states_refresh_and_a_loading_or_removed_model_shows_the_gateways_refusal(
    browser: Browser,
) -> None:
    """The picker and the fleet table show a model loading, then ready on a later
    refresh without a reload; a question to it while loading shows the gateway's 503 and
    its Retry-After, and one to a model the gateway stopped serving shows the 404."""
    status = FakeStatusSource()
    status.set(CHAT_MODEL, "loading", min_replicas=1, max_replicas=3)
    status.set(COMPLETIONS_MODEL, "ready")
    fleet = make_fleet(status=status)
    with serve_app(fleet.app) as base_url, watched_page(browser, base_url) as watch:
        page = watch.page
        open_chat(watch, f"{base_url}/ui", CHAT_MODEL)
        assert page.inner_text("#model-state") == "loading"
        # model, state, running, starting, min, max
        assert _fleet_row(watch, CHAT_MODEL) == [CHAT_MODEL, "loading", "0", "1", "1", "3"]
        ask(watch, "hello")
        assert re.fullmatch(r"503: .+ \(retry after \d+ s\)", _shown_error(watch))
        assert page.locator("#conversation .turn.assistant").count() == 0  # no empty reply

        status.set(CHAT_MODEL, "ready", min_replicas=1, max_replicas=3)
        page.wait_for_function(
            "() => document.querySelector('#model-state').textContent === 'ready'",
            timeout=15_000,  # the page refreshes every 5 s
        )
        _wait_for_row(watch, CHAT_MODEL, [CHAT_MODEL, "ready", "1", "0", "1", "3"])
        ask(watch, "hello again")
        assert last_reply_done(watch) == "hello again"

        fleet.app.state.pipeline.remove_model(CHAT_MODEL)
        ask(watch, "still there")
        assert _shown_error(watch).startswith("404: ")
        assert watch.foreign == []
        # Only the browser's network lines for the two refusals, none of the page's own.
        assert len(watch.console_errors) == 2, watch.console_errors
        assert all(re.search(r"\b(503|404)\b", line) for line in watch.console_errors)


def test_a_key_over_its_rate_shows_the_429_and_its_retry_after(
    browser: Browser, tmp_path: Path
) -> None:
    key = create_key(tmp_path / "keys.yaml", "one-a-minute", rpm=1)
    app = make_fleet(keys=KeyRing.from_file(tmp_path / "keys.yaml")).app
    with serve_app(app) as base_url, watched_page(browser, base_url) as watch:
        open_chat(watch, f"{base_url}/ui", CHAT_MODEL, key=key)
        ask(watch, "first")
        assert last_reply_done(watch) == "first"
        ask(watch, "second")
        shown = _shown_error(watch)
        assert re.fullmatch(r"429: .+ \(retry after \d+ s\)", shown), shown
        assert watch.foreign == []
