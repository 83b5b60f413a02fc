"""The web console at /ui/ and the API's documentation at /docs, both served from files in
the wheel (clusters often have no internet: nothing comes from a CDN).

The console is a static page that calls the /v1 API from the browser, so it needs no auth
of its own: with a token configured, the page asks for it and sends `Authorization: Bearer`.
"""

from __future__ import annotations

import importlib.util
from importlib import resources
from pathlib import Path

from aiohttp import web

from ap4k.core.version import version

CONSOLE_DIR = Path(str(resources.files("ap4k.server") / "console"))


def swagger_ui_dir() -> Path | None:
    """Swagger UI's static files, from the swagger-ui-py wheel (found, not imported: its
    Python side brings template engines we do not use)."""
    spec = importlib.util.find_spec("swagger_ui")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(spec.submodule_search_locations[0]) / "static"


def _wants_html(request: web.Request) -> bool:
    return "text/html" in request.headers.get("Accept", "")


async def root(request: web.Request) -> web.StreamResponse:
    """Browsers go to the console; programs get a short description of where things are."""
    if _wants_html(request):
        raise web.HTTPFound("ui/")
    return web.json_response(
        {
            "name": "ap4k",
            "version": version(),
            "console": "/ui/",
            "docs": "/docs",
            "openapi": "/openapi.json",
        }
    )


async def to_console(request: web.Request) -> web.StreamResponse:
    raise web.HTTPFound("ui/")


def _page(name: str) -> web.FileResponse:
    # The pages are tiny and change with every release: let browsers revalidate them.
    return web.FileResponse(CONSOLE_DIR / name, headers={"Cache-Control": "no-cache"})


async def console_page(request: web.Request) -> web.StreamResponse:
    return _page("index.html")


async def docs_page(request: web.Request) -> web.StreamResponse:
    if swagger_ui_dir() is None:
        return web.Response(
            status=503,
            text="The API docs need swagger-ui-py: pip install 'ap4k[server]'. "
            "The document itself is at /openapi.json.",
        )
    return _page("docs.html")


def add_console_routes(app: web.Application) -> None:
    app.router.add_get("/", root)
    app.router.add_get("/ui", to_console)
    app.router.add_get("/ui/", console_page)
    app.router.add_static("/ui/assets", CONSOLE_DIR, append_version=False)
    app.router.add_get("/docs", docs_page)
    swagger_ui = swagger_ui_dir()
    if swagger_ui is not None:
        app.router.add_static("/docs/assets", swagger_ui)
