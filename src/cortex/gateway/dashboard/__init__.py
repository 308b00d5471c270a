"""The fleet dashboard at `/ui`: plain HTML + vanilla JS polling the operator JSON (docs/fleet.md).

No build step and no CDN (fleets often have no internet): three static files shipped as package
data, served from memory. The page itself holds no secrets and is open; everything it shows or
does goes through the admin JSON — `GET /admin/state`, `POST /admin/load|unload|pin`, and
`GET /admin/live` added here (per-model tok/s, TTFT, error rate and recent cold loads/evictions,
from the gateway's own metrics, see live.py) — so it sits behind `gateway.admin_key` like the
CLI: the page asks for the key and sends it as a bearer token.

Mounted with one line in the app factory: `dashboard.setup(app, metrics_text=...)`.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib import resources

from aiohttp import web

from cortex.core.errors import ApiError
from cortex.gateway.bodies import json_response
from cortex.gateway.dashboard.live import LiveFigures
from cortex.gateway.pipeline import Access, Dialect, endpoint

_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8", ".css": "text/css"}
_FILES = ("index.html", "app.js", "style.css")
# The page talks only to this gateway: no inline scripts, no third-party anything.
_CSP = "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; frame-ancestors 'none'"


def setup(app: web.Application, metrics_text: Callable[[], bytes]) -> None:
    """`GET /ui` (the page and its two assets) and `GET /admin/live` (its live figures)."""
    static = resources.files(__package__).joinpath("static")
    files = {name: static.joinpath(name).read_bytes() for name in _FILES}
    live = LiveFigures(metrics_text)

    @endpoint(access=Access.OPEN, dialect=Dialect.OPENAI)
    async def page(request: web.Request) -> web.StreamResponse:
        name = request.match_info.get("name") or "index.html"
        body = files.get(name)
        if body is None:
            raise ApiError(404, f"no dashboard file '{name}'", code="unknown_route")
        suffix = name[name.rindex(".") :]
        headers = {"Content-Type": _TYPES[suffix], "Cache-Control": "no-cache", "Content-Security-Policy": _CSP}
        return web.Response(body=body, headers=headers)

    @endpoint(access=Access.OPEN, dialect=Dialect.OPENAI)
    async def slash(request: web.Request) -> web.StreamResponse:
        return web.Response(status=302, headers={"Location": "/ui/"})

    @endpoint(access=Access.ADMIN, dialect=Dialect.OPENAI)
    async def live_figures(request: web.Request) -> web.StreamResponse:
        return json_response(live.snapshot())

    app.router.add_get("/ui", slash)
    app.router.add_get("/ui/", page)
    app.router.add_get("/ui/{name}", page)
    app.router.add_get("/admin/live", live_figures)
