"""The chat page (``GET /ui``, ``router/chat_ui.py``) in a real headless chromium on the
app served by uvicorn, the fake engine behind it: it streams, stops, shows the
gateway's errors and renders model output as text. ``tests/serve/test_chat_ui.py`` runs
it on the real fleet."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from fastapi.testclient import TestClient

from llm_fleet.router.auth import KeyRing
from llm_fleet.router.chat_ui import ASSETS
from llm_fleet.router.keys_file import create_key
from tests.browser import (
    ask,
    assert_air_gapped,
    chromium,
    last_reply_done,
    open_chat,
    seen_while_streaming,
    serve_app,
    watched_page,
)
from tests.fake_handle import run_sync
from tests.fakes import CHAT_MODEL, MAX_TOKENS_LIMIT, make_fleet

if TYPE_CHECKING:
    from playwright.sync_api import Browser


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with chromium() as launched:
        yield launched


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
        # The fleet table came from /health/ready, the picker from /v1/models.
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
    key = create_key(tmp_path / "keys.yaml", "chatter")
    app = make_fleet(keys=KeyRing.from_file(tmp_path / "keys.yaml")).app
    with serve_app(app) as base_url, watched_page(browser, base_url) as watch:
        watch.page.goto(f"{base_url}/ui")
        error = watch.page.locator("#error")
        error.wait_for()
        assert error.inner_text() == "401: Invalid or missing API key."
        watch.page.fill("#api-key", "lfk_not-a-key")
        watch.page.dispatch_event("#api-key", "change")
        watch.page.wait_for_function("() => document.querySelector('#error').textContent")
        assert "401: Invalid or missing API key." in error.inner_text()
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
