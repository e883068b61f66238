"""A real browser on the real app, for the tests of the gateway's pages.

``serve_app`` serves a FastAPI app with uvicorn on a loopback port in a thread;
``chromium`` launches Debian's ``chromium`` (``make chromium`` installs it; Playwright
from PyPI drives it, ``playwright install`` is never run) headless, with flags that
work as root in a container; ``watched_page`` opens a page in it. ``BrowserWatch``
records every request a page makes and every console error; a request to any other
origin than the app's is aborted (nothing leaves the machine) and kept in ``foreign``.
"""

from __future__ import annotations

import json
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import uvicorn

if TYPE_CHECKING:
    from playwright.sync_api import Browser, ConsoleMessage, Page, Request, Response, Route
    from starlette.types import ASGIApp

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",  # root in a container has no user namespace for the sandbox
    "--disable-dev-shm-usage",  # a container's /dev/shm is small
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]


@contextmanager
def serve_app(app: ASGIApp, start_timeout_s: float = 30.0) -> Iterator[str]:
    """``app`` served by uvicorn on a free loopback port in a thread of its own until the
    block ends; yields its base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def chromium_binary() -> str:
    binary = shutil.which("chromium")
    if binary is None:
        raise RuntimeError("chromium is not installed: make chromium (apt-get install chromium)")
    return binary


@dataclass
class BrowserWatch:
    """A page of a headless chromium, and what it did: every request's URL (``requests``),
    those to another origin than ``origin`` (``foreign``, aborted) and console errors."""

    page: Page
    origin: str
    requests: list[str] = field(default_factory=list)
    foreign: list[str] = field(default_factory=list)
    console_errors: list[str] = field(default_factory=list)

    def _on_request(self, request: Request) -> None:
        # data: and blob: URLs (the stylesheet's icons) are the page's own: no request.
        if not request.url.startswith(("data:", "blob:")):
            self.requests.append(request.url)

    def _on_console(self, message: ConsoleMessage) -> None:
        if message.type == "error":
            self.console_errors.append(f"{message.text} at {message.location}")

    def _on_page_error(self, error: Exception) -> None:
        self.console_errors.append(f"uncaught: {error}")

    def _route(self, route: Route) -> None:
        url = route.request.url
        if _origin(url) == self.origin or url.startswith(("data:", "blob:")):
            route.continue_()
        else:
            self.foreign.append(url)
            route.abort()


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


@contextmanager
def chromium() -> Iterator[Browser]:
    """A headless chromium (Debian's), closed when the block ends; one per test module
    (a launch takes seconds), a fresh context per page (``watched_page``)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=chromium_binary(), headless=True, args=CHROMIUM_FLAGS
        )
        try:
            yield browser
        finally:
            browser.close()


@contextmanager
def watched_page(
    browser: Browser, base_url: str, timeout_s: float = 30.0
) -> Iterator[BrowserWatch]:
    """A page in a context of its own (no cookies or storage from another test), watched
    (``BrowserWatch``) for ``base_url``'s origin; Playwright's waits time out after
    ``timeout_s``."""
    context = browser.new_context()
    try:
        context.set_default_timeout(timeout_s * 1000)
        page = context.new_page()
        watch = BrowserWatch(page, _origin(base_url))
        page.on("request", watch._on_request)
        page.on("console", watch._on_console)
        page.on("pageerror", watch._on_page_error)
        context.route("**/*", watch._route)
        yield watch
    finally:
        context.close()


# --- Swagger UI (/swagger-ui) ---------------------------------------------------------------


def assert_air_gapped(watch: BrowserWatch) -> None:
    """The page made requests, every one to its own origin."""
    assert watch.requests, "the page made no request"
    assert watch.foreign == [], watch.foreign
    assert all(url.startswith(watch.origin + "/") for url in watch.requests), watch.requests
    assert watch.console_errors == [], watch.console_errors


def open_operation(watch: BrowserWatch, path: str) -> None:
    """Expand the operation of ``path`` and press its "Try it out"."""
    block = watch.page.locator(f".opblock:has(.opblock-summary-path[data-path='{path}'])")
    block.locator(".opblock-summary").first.click()
    block.get_by_role("button", name="Try it out").click()


def execute(watch: BrowserWatch, path: str, body: dict[str, object]) -> tuple[str, str]:
    """Fill in ``path``'s JSON body, execute it; the status and body the panel shows."""
    block = watch.page.locator(f".opblock:has(.opblock-summary-path[data-path='{path}'])")
    clear = block.get_by_role("button", name="Clear")
    if clear.count():
        clear.click()  # the last answer goes, so the one read below is this one's
    block.locator("textarea.body-param__text").fill(json.dumps(body))
    block.get_by_role("button", name="Execute").click()
    answer = block.locator(".live-responses-table tbody tr.response").first
    status = answer.locator(".response-col_status").inner_text().strip()
    shown = answer.locator(".response-col_description pre").first.inner_text()
    return status, shown


# --- the chat page (/ui) --------------------------------------------------------------------

# Installed in the page before a question is sent: every change of the last reply's text is
# recorded with whether the reply was still streaming, so a test can tell a streamed
# answer (text seen while streaming) from one that arrived whole.
WATCH_REPLY = """() => {
  window.__seen = [];
  new MutationObserver(() => {
    const replies = document.querySelectorAll('#conversation .turn.assistant');
    const last = replies[replies.length - 1];
    if (last) window.__seen.push({text: last.querySelector('.body').textContent,
                                  state: last.dataset.state});
  }).observe(document.getElementById('conversation'),
             {subtree: true, childList: true, characterData: true, attributes: true});
}"""


def open_chat(watch: BrowserWatch, url: str, model: str, key: str | None = None) -> None:
    """Open the chat page at ``url``, type ``key`` (if any), and pick ``model`` once the
    page has listed it."""
    page = watch.page
    page.goto(url)
    if key is not None:
        page.fill("#api-key", key)
        page.dispatch_event("#api-key", "change")
    page.locator(f"#model option[value='{model}']").wait_for(state="attached")
    page.select_option("#model", model)


def type_key(watch: BrowserWatch, key: str) -> int:
    """Type ``key`` into the page's key field; the status of the model list the page then
    asks for with that key (``#error`` is emptied first, so what it shows after is the
    answer to this key, not to an earlier one)."""
    page = watch.page
    page.evaluate("() => { document.querySelector('#error').textContent = ''; }")

    def with_key(response: Response) -> bool:
        sent = response.request.headers.get("authorization")
        return response.url.endswith("/v1/models") and sent == f"Bearer {key}"

    with page.expect_response(with_key) as answer:
        page.fill("#api-key", key)
        page.dispatch_event("#api-key", "change")
    return int(answer.value.status)


def ask(watch: BrowserWatch, text: str, *, max_tokens: int | None = None) -> None:
    """Send ``text`` from the page (its reply then streams in)."""
    page = watch.page
    page.evaluate(WATCH_REPLY)
    if max_tokens is not None:
        page.fill("#max-tokens", str(max_tokens))
    page.fill("#prompt", text)
    page.click("#send")


def last_reply_done(watch: BrowserWatch, timeout_s: float = 120) -> str:
    """The last reply's text once it stopped streaming."""
    reply = watch.page.locator("#conversation .turn.assistant").last
    reply.and_(watch.page.locator("[data-state='done']")).wait_for(timeout=timeout_s * 1000)
    return str(reply.locator(".body").inner_text())


def seen_while_streaming(watch: BrowserWatch, word: str, pieces: int = 3) -> bool:
    """Whether ``word`` was in the last reply while it was still streaming, and the
    reply grew through at least ``pieces`` different texts while streaming. The page
    keeps a reply's state "streaming" until its request ends, so the word alone would
    not tell a streamed reply from one that arrived whole; the growing text does."""
    seen = watch.page.evaluate("() => window.__seen")
    streaming = [s["text"] for s in seen if s["state"] == "streaming"]
    grown = {text for text in streaming if text.strip()}
    return any(word in text for text in streaming) and len(grown) >= pieces
