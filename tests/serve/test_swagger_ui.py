"""``/swagger-ui`` on the real fleet, in headless chromium (``tests/browser.py``): the
page loads with no request leaving the gateway, and **Try it out** on ``/api/generate``
returns SmolLM2's text."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import pytest

from tests.browser import assert_air_gapped, execute, open_operation, watched_page
from tests.serve.conftest import CHAT_MODEL, Fleet

if TYPE_CHECKING:
    from playwright.sync_api import Browser

pytestmark = [pytest.mark.serve, pytest.mark.slow]


def test_try_it_out_on_api_generate_returns_text(fleet: Fleet, browser: Browser) -> None:
    body = {"model": CHAT_MODEL, "prompt": "What is the capital of France?", "max_tokens": 30}
    with watched_page(browser, fleet.base_url) as watch:
        watch.page.goto(f"{fleet.base_url}/swagger-ui")
        watch.page.locator(".opblock-summary-path[data-path='/api/generate']").wait_for()
        open_operation(watch, "/api/generate")
        status, shown = execute(watch, "/api/generate", {**body, "temperature": 0})
        assert status == "200", shown
        answer = json.loads(shown)
        assert "Paris" in answer["text"], answer
        assert_air_gapped(watch)
        assert watch.console_errors == [], watch.console_errors
        assert f"{fleet.base_url}/api/generate" in watch.requests
