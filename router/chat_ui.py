"""``GET /ui``: the chat page, served by the gateway itself (``GET /`` redirects to it).

Plain HTML, CSS and JavaScript in ``router/static`` (``chat.html``, ``chat.js``,
``chat.css``): no framework, no CDN, no build step, so it works air-gapped and the
wheel ships it as it is. Decided so: the page is small (a model picker, a conversation,
a fleet table), and a vendored framework would be a dependency to audit and update for
no feature the page needs.

It is reachable where the API is and no further: the same port, TLS and CORS. The page
and its files need no key; every call it makes carries the key typed into it (kept in
the tab's ``sessionStorage``, never in a URL). It calls only its own origin, with
relative URLs (so it works under a Serve route prefix, as ``/m/<id>/ui`` on a direct
door): ``v1/models`` and ``api/llms`` (the models the key may use, their state and
defaults), ``health/live`` (the fleet table: ``/health/ready``'s per-model body, with a
200 even while a model loads, which the browser would otherwise log as an error), and
``v1/chat/completions`` / ``v1/completions`` (streamed; Stop aborts the request, which
aborts the generation).
Model output is untrusted: the page renders a small markdown subset by building DOM
nodes with ``textContent``, never HTML, and its Content-Security-Policy
(``script-src 'self'``, ``connect-src 'self'``) forbids inline scripts and other origins.
"""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import RedirectResponse

from llm_fleet.router.swagger_ui import page_routes, static_file

PAGE = "/ui"
ASSETS: dict[str, tuple[str, str]] = {
    "chat.js": (static_file("chat.js"), "text/javascript"),
    "chat.css": (static_file("chat.css"), "text/css"),
}


def chat_ui_routes() -> APIRouter:
    """The page at ``/ui``, its files under it, and ``/`` redirecting to it."""
    routes = page_routes(PAGE, "chat.html", ASSETS)

    @routes.get("/")
    async def root() -> RedirectResponse:
        # Relative, so that under a route prefix it stays under it.
        return RedirectResponse("ui", status_code=302)

    return routes
