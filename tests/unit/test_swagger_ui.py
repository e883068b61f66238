"""``GET /swagger-ui``: Swagger UI over the gateway's own ``/openapi.json``, every file
from the gateway itself (air-gapped), under a strict Content-Security-Policy.

The browser tests open the page in a real headless chromium (``tests/browser.py``) on
the app served by uvicorn, the fake engine behind it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from starlette.applications import Starlette
from starlette.routing import Mount

from llm_fleet.router.auth import KeyRing
from llm_fleet.router.keys_file import create_key
from llm_fleet.router.swagger_ui import ASSETS
from tests.browser import (
    assert_air_gapped,
    execute,
    open_operation,
    serve_app,
    watched_page,
)
from tests.fakes import COMPLETIONS_MODEL, make_fleet

if TYPE_CHECKING:
    from playwright.sync_api import Browser

PROMPT = {"model": COMPLETIONS_MODEL, "prompt": "the swagger page says", "max_tokens": 8}


def keyed_fleet(tmp_path: Path) -> tuple[FastAPI, str]:
    """The app with API keys, and its one key."""
    key = create_key(tmp_path / "keys.yaml", "docs-reader")
    return make_fleet(keys=KeyRing.from_file(tmp_path / "keys.yaml")).app, key


def test_the_page_and_its_files_need_no_key(tmp_path: Path) -> None:
    http = TestClient(keyed_fleet(tmp_path)[0])
    page = http.get("/swagger-ui")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert page.headers["x-content-type-options"] == "nosniff"
    for name in ASSETS:
        asset = http.get(f"/swagger-ui/{name}")
        assert asset.status_code == 200, name
        assert asset.headers["x-content-type-options"] == "nosniff"
    assert (
        http.get("/swagger-ui/swagger-ui-bundle.js")
        .headers["content-type"]
        .startswith("text/javascript")
    )
    assert http.get("/openapi.json").status_code == 200
    assert http.get("/v1/models").status_code == 401  # the API itself still needs one


def test_the_page_names_no_other_origin_and_runs_no_inline_script() -> None:
    http = TestClient(make_fleet().app)
    page = http.get("/swagger-ui").text
    init = http.get("/swagger-ui/swagger-ui-init.js").text
    assert not re.search(r"(https?:)?//", page), page
    assert not re.search(r"https?://", init), init
    # every script is a file of its own, so script-src 'self' holds
    scripts = re.findall(r"<script( src=\"[^\"]+\")?>(.*?)</script>", page, re.S)
    assert scripts and all(src and not inline.strip() for src, inline in scripts), scripts
    assert http.get("/swagger-ui/redoc.standalone.js").status_code == 404  # only ASSETS


# "": the app at the server's root; "/m/gemma": under a prefix, as Serve's route prefix
# mounts it (the direct door's app is under /m/<id>).
@pytest.mark.parametrize("prefix", ["", "/m/gemma"])
def test_swagger_ui_renders_and_tries_a_completion_in_a_browser(
    browser: Browser, prefix: str
) -> None:
    app = make_fleet().app
    operations = sum(len(item) for item in app.openapi()["paths"].values())
    served = Starlette(routes=[Mount(prefix, app=app)]) if prefix else app
    with serve_app(served) as base_url, watched_page(browser, base_url) as watch:
        watch.page.goto(f"{base_url}{prefix}/swagger-ui")
        chat = watch.page.locator(".opblock-summary-path[data-path='/v1/chat/completions']")
        chat.wait_for()
        assert watch.page.locator(".opblock-summary-path").count() == operations
        open_operation(watch, "/v1/completions")
        status, shown = execute(watch, "/v1/completions", PROMPT)
        assert status == "200", shown
        answer = json.loads(shown)
        assert answer["object"] == "text_completion" and answer["choices"][0]["text"]
        assert_air_gapped(watch)
        assert all(url.startswith(f"{base_url}{prefix}/") for url in watch.requests)
        assert f"{base_url}{prefix}/v1/completions" in watch.requests


def test_try_it_out_sends_the_key_given_to_authorize(browser: Browser, tmp_path: Path) -> None:
    app, key = keyed_fleet(tmp_path)
    with serve_app(app) as base_url, watched_page(browser, base_url) as watch:
        page = watch.page
        page.goto(f"{base_url}/swagger-ui")
        open_operation(watch, "/v1/completions")
        status, _ = execute(watch, "/v1/completions", PROMPT)
        assert status == "401"  # no key given yet
        # Chromium logs the refusal as a console error: the only one allowed.
        assert len(watch.console_errors) == 1 and "401" in watch.console_errors[0]
        watch.console_errors.clear()
        page.get_by_role("button", name="Authorize").first.click()
        page.locator("#auth-bearer-value").fill(key)
        page.get_by_role("button", name="Apply credentials").click()
        page.locator(".auth-btn-wrapper button.btn-done").click()
        status, shown = execute(watch, "/v1/completions", PROMPT)
        assert status == "200", shown
        assert json.loads(shown)["choices"][0]["text"]
        assert_air_gapped(watch)
