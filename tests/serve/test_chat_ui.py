"""The chat page (``/ui``) on the real fleet, in headless chromium (``tests/browser.py``):
SmolLM2's "Paris" streams in, Stop ends the generation in vLLM, completion mode continues
a prompt, a wrong key shows the gateway's 401, and model output with markup renders as
text (a fake engine that echoes writes it: no real model does so reliably); no request
leaves the gateway and the console stays clean. The screenshot goes to
``$LLM_FLEET_SCREENSHOTS`` (default: the test's temporary folder); the README's
``docs/chat-page.png`` is one."""

from __future__ import annotations

import concurrent.futures
import functools
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from llm_fleet.router.keys_file import create_key
from tests.browser import (
    ask,
    assert_air_gapped,
    last_reply_done,
    open_chat,
    seen_while_streaming,
    type_key,
    watched_page,
)
from tests.serve.conftest import CHAT_MODEL, Fleet, deployment_handle
from tests.serve.fake_apps import ONE_ROUTER, deployed, fake_model

if TYPE_CHECKING:
    from playwright.sync_api import Browser

pytestmark = [pytest.mark.serve, pytest.mark.slow]


# One thread and one handle per model: Playwright's sync API keeps an event loop on the
# test's thread, where Serve's handles refuse to block; and a new handle first waits
# for the controller's replica list (seconds on a loaded machine), which must not eat
# into the time allowed for an abort.
_ENGINE_CALLS = concurrent.futures.ThreadPoolExecutor(1)


@functools.cache
def _handle(model: str) -> Any:
    return deployment_handle(model)


def _running(model: str) -> int:
    """The engine's running requests."""

    def ask_engine() -> int:
        return int(_handle(model).num_unfinished_requests.remote().result())

    return _ENGINE_CALLS.submit(ask_engine).result()


@pytest.mark.usefixtures("ray_driver")
def test_chat_streams_paris_and_stop_ends_the_generation(
    fleet: Fleet, browser: Browser, tmp_path: Path
) -> None:
    with watched_page(browser, fleet.base_url, timeout_s=120) as watch:
        open_chat(watch, f"{fleet.base_url}/ui", CHAT_MODEL)
        watch.page.fill("#temperature", "0")
        ask(watch, "What is the capital of France?", max_tokens=60)
        answer = last_reply_done(watch)
        assert "Paris" in answer, answer
        assert seen_while_streaming(watch, "Paris"), "Paris arrived only with the whole reply"
        assert "time to first token" in watch.page.inner_text("#stats")
        shots = Path(os.environ.get("LLM_FLEET_SCREENSHOTS", str(tmp_path)))
        shots.mkdir(parents=True, exist_ok=True)
        watch.page.set_viewport_size({"width": 1100, "height": 640})
        watch.page.screenshot(path=str(shots / "chat-page.png"))
        print(f"screenshot: {shots / 'chat-page.png'}")

        ask(watch, "Write a very long story about a dragon.", max_tokens=600)
        reply = watch.page.locator("#conversation .turn.assistant").last
        reply.and_(watch.page.locator("[data-state='streaming']")).wait_for()
        deadline = time.monotonic() + 60
        while not reply.locator(".body").inner_text().strip():
            assert time.monotonic() < deadline, "no token arrived"
            time.sleep(0.2)
        assert _running(CHAT_MODEL) >= 1
        watch.page.click("#stop")
        stopped = last_reply_done(watch, timeout_s=10)
        assert watch.page.locator(".turn.assistant[data-stopped='true']").count() == 1
        # 600 tokens take SmolLM2 tens of seconds here: back to 0 within 3 s of Stop is
        # the abort, not the story's end.
        deadline = time.monotonic() + 3
        while (running := _running(CHAT_MODEL)) != 0:
            assert time.monotonic() < deadline, f"{running} generation(s) still running"
            time.sleep(0.1)
        assert len(stopped.split()) < 200, stopped

        # Completion mode: the same model continues a prompt through /v1/completions.
        watch.page.select_option("#mode", "completion")
        ask(watch, "The capital of France is", max_tokens=8)
        assert last_reply_done(watch).strip()
        assert f"{fleet.base_url}/v1/completions" in watch.requests
        assert_air_gapped(watch)
        fleet_rows = watch.page.locator("#fleet-rows tr").all_inner_texts()
        assert any(row.startswith(CHAT_MODEL) and "ready" in row for row in fleet_rows), fleet_rows


@pytest.mark.usefixtures("ray_driver")
def test_keys_and_markup_on_a_keyed_app(fleet: Fleet, browser: Browser, tmp_path: Path) -> None:
    """A keyed app on the same cluster (the fake engine echoes the prompt: its output is
    what the page renders): a wrong key shows the 401, the right one chats, and an
    answer holding ``<script>`` is text."""
    keys = tmp_path / "keys.yaml"
    key = create_key(keys, "chat-page")
    args = {
        "router": {**ONE_ROUTER, "keys_file": str(keys)},
        "models": [fake_model("echo")],
    }
    with (
        deployed(fleet.base_url, "chat-keys", args, 120) as url,
        watched_page(browser, fleet.base_url) as watch,
    ):
        watch.page.goto(f"{url}/ui")
        error = watch.page.locator("#error")
        error.wait_for()
        assert type_key(watch, "lfk_wrong") == 401
        watch.page.wait_for_function("() => document.querySelector('#error').textContent")
        assert error.inner_text() == "401: Invalid or missing API key."
        open_chat(watch, f"{url}/ui", "echo", key=key)
        hostile = "<script>window.pwned=1</script> <img src=x onerror=window.pwned=2>"
        ask(watch, hostile)
        assert "<script>window.pwned=1</script>" in last_reply_done(watch)
        body = watch.page.locator("#conversation .turn.assistant .body").last
        assert body.locator("script, img").count() == 0
        assert watch.page.evaluate("() => window.pwned") is None
        assert watch.foreign == []
        assert all("401" in line for line in watch.console_errors), watch.console_errors
