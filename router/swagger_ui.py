"""``GET /swagger-ui``: Swagger UI over the gateway's own ``/openapi.json``.

Air-gapped: every file the page loads comes from this gateway. Swagger UI's script and
stylesheet are the ones the ``fastapi-offline`` package ships (Swagger UI 5, which reads
OpenAPI 3.1); the page and its init script are ours (``router/static/``). The page's
URLs are relative, so it works under a Serve route prefix and behind TLS, and its
Content-Security-Policy lets it load and fetch from its own origin only. No API key is
needed to read it, as for ``/openapi.json``: neither names a model. "Try it out" takes
the key through the Authorize button (the document's bearer scheme).

FastAPI's own ``/docs`` and ``/redoc`` stay off (``create_app``): they load Swagger UI
and ReDoc from a CDN.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from importlib.resources import files
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, HTMLResponse

PAGE = "/swagger-ui"

# Swagger UI sets inline styles through the DOM (allowed by style-src 'self'); its
# stylesheet draws icons from data: URLs.
CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data:",
        "connect-src 'self'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    ]
)
_PAGE_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
# The files change only with the gateway's version: an hour in the browser's cache.
_ASSET_HEADERS = {"X-Content-Type-Options": "nosniff", "Cache-Control": "public, max-age=3600"}

_OURS = files("llm_fleet.router.static")
_VENDOR = files("fastapi_offline") / "static"
# Under PAGE, what the page loads: file name -> (the file, its media type).
ASSETS: dict[str, tuple[str, str]] = {
    "swagger-ui-bundle.js": (str(_VENDOR / "swagger-ui-bundle.js"), "text/javascript"),
    "swagger-ui.css": (str(_VENDOR / "swagger-ui.css"), "text/css"),
    "favicon.png": (str(_VENDOR / "favicon.png"), "image/png"),
    "swagger-ui-init.js": (str(_OURS / "swagger-ui-init.js"), "text/javascript"),
}


def swagger_ui_routes() -> APIRouter:
    """The page at ``PAGE`` and each of ``ASSETS`` under it; none in ``/openapi.json``."""
    return page_routes(PAGE, "swagger-ui.html", ASSETS)


def page_routes(page: str, html: str, assets: dict[str, tuple[str, str]]) -> APIRouter:
    """One of the gateway's pages: ``html`` (a file of ``router/static``) at ``page``
    with its headers (the strict CSP above), and each of ``assets`` under it, out of
    ``/openapi.json``. A missing file stops the app at its start."""
    routes = APIRouter(include_in_schema=False)
    text = (_OURS / html).read_text(encoding="utf-8")
    for path, _ in assets.values():
        if not Path(path).is_file():
            raise FileNotFoundError(f"{path} is missing from the installed package")

    @routes.get(page)
    async def serve_page() -> HTMLResponse:
        return HTMLResponse(text, headers=_PAGE_HEADERS)

    for name, (path, media_type) in assets.items():
        routes.add_api_route(f"{page}/{name}", _asset(path, media_type), methods=["GET"])
    return routes


def static_file(name: str) -> str:
    """The path of ``router/static/<name>``, as installed."""
    return str(_OURS / name)


def _asset(path: str, media_type: str) -> Callable[[], Awaitable[FileResponse]]:
    async def asset() -> FileResponse:
        return FileResponse(path, media_type=media_type, headers=_ASSET_HEADERS)

    return asset
